//! PacketFS entry points.
//!
//! * `cargo xtask bench` — the main job: installs the baseline tools, builds, runs
//!   `pfs-bench` over every backend this machine can run, side by side with iperf3 and
//!   sockperf (interleaved), and ends with the reality check.
//! * `cargo xtask test` — everything CI runs: formatting, clippy, licences, every test
//!   tier (the rdma conformance suite inside the soft-RoCE VM of `tools/rdma-vm.sh`), the
//!   chaos test, and a quick run of the main job; prints the time of each phase.
//! * `cargo xtask fuzz [--seconds N]` — build the AFL++ fuzz targets in `fuzz/` and run
//!   each for N seconds (default 25) from its committed corpus; fails on any crash or hang.
//! * `cargo xtask memcheck` — the unsafe-code audit: `transport/tests/memcheck.rs` under
//!   valgrind memcheck (rings, UMEM, registered memory); fails on any memory error.
//! * `cargo xtask chaos [--seconds N]` — the chaos test (`transport/tests/chaos.rs`: node
//!   processes killed and restarted, 5% packet loss, every operation verified) for N
//!   seconds (default 120); needs root.
//! * `cargo xtask deps` — install what the two commands need (idempotent).
//! * `cargo xtask licenses` — check every dependency's licence against the allowed list.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str =
    "usage: cargo xtask <bench [--quick] | test | fuzz [--seconds N] | chaos [--seconds N] |
                    memcheck | deps | licenses>

  bench      the main job: pfs-bench on every available backend, side by side with
             iperf3 and sockperf (interleaved, median ratio), ending in the reality check
             --quick   shorter runs (a smoke test of the main job)
  test       fmt, clippy, licences, all tests (rdma's inside the soft-RoCE VM, as
             root), the 2-minute chaos test (as root), a short fuzz run and a quick
             main job; prints phase times
  fuzz       run every fuzz target (AFL++, stable toolchain) for --seconds N each
             (default 25); installs cargo-afl if missing; fails on a crash or hang
  chaos      the chaos test for --seconds N (default 120): node processes killed and
             restarted, 5% packet loss in a private network namespace, every operation
             verified; needs root and nft (cargo xtask deps)
  memcheck   the memory audit: transport/tests/memcheck.rs under valgrind memcheck;
             fails on an invalid access, an uninitialised value or a definite leak
  deps       install the Debian packages the commands need (idempotent; needs root)
  licenses   check dependency licences";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("bench") => bench(args[1..].iter().any(|a| a == "--quick")),
        Some("test") => test(),
        Some("fuzz") => match seconds(&args[1..], FUZZ_SECONDS) {
            Ok(secs) => fuzz(secs),
            Err(e) => {
                eprintln!("{e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("chaos") => match seconds(&args[1..], CHAOS_SECONDS) {
            Ok(secs) => chaos(secs, true),
            Err(e) => {
                eprintln!("{e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        Some("memcheck") => memcheck(),
        Some("deps") => deps(),
        Some("licenses") | Some("licences") => licenses(),
        Some("-h") | Some("--help") | Some("help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            eprintln!("unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

type R = Result<(), String>;

fn root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .expect("xtask lives in tools/xtask")
        .to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Run a command in the repository root, echoing it; fail with its name on error.
fn run(cmd: &str, args: &[&str]) -> R {
    run_with(cmd, args, &[])
}

/// [`run`] with extra environment variables.
fn run_with(cmd: &str, args: &[&str], envs: &[(&str, &str)]) -> R {
    for (k, v) in envs {
        print!("{k}={v} ");
    }
    println!("$ {cmd} {}", args.join(" "));
    let status = Command::new(cmd)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd} {}` failed ({status})", args.join(" ")))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Debian packages, each with what proves it is installed: a tool on PATH, or a file.
const PACKAGES: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("sockperf", "sockperf"),
    ("taskset", "util-linux"),
    ("nsenter", "util-linux"),
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("ethtool", "ethtool"),
    ("tcpdump", "tcpdump"),
    // The chaos test: packet loss inside its private network namespace.
    ("nft", "nftables"),
    // The memory audit of the unsafe code.
    ("valgrind", "valgrind"),
    // Lint of the shell tools (tools/*.sh).
    ("shellcheck", "shellcheck"),
    // The xdp feature: clang builds the XDP program, and libxdp is built from source.
    ("clang", "clang"),
    ("llc", "llvm"),
    ("m4", "m4"),
    ("pkg-config", "pkg-config"),
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/zlib.h", "zlib1g-dev"),
    ("/usr/include/pcap/pcap.h", "libpcap-dev"),
    // The rdma feature: rdma-sys generates its bindings with bindgen (libclang) from the
    // verbs and rdma_cm headers, and links libibverbs and librdmacm.
    ("/usr/include/infiniband/verbs.h", "libibverbs-dev"),
    ("/usr/include/rdma/rdma_cma.h", "librdmacm-dev"),
    ("/usr/lib/llvm-*/lib/libclang.so", "libclang-dev"),
    // pfs-bench info: NUMA placement of NICs through hwloc.
    ("/usr/include/hwloc.h", "libhwloc-dev"),
    ("/usr/include/libudev.h", "libudev-dev"),
    // pfs-bench plot: the font its text is drawn with.
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
];

fn installed(probe: &str) -> bool {
    match probe.split_once('*') {
        // One `*` in a directory name: /usr/lib/llvm-*/lib/libclang.so.
        Some((head, tail)) => {
            let (dir, prefix) = head.rsplit_once('/').unwrap_or(("/", head));
            let (suffix, rest) = tail.split_once('/').unwrap_or((tail, ""));
            std::fs::read_dir(if dir.is_empty() { "/" } else { dir })
                .map(|entries| {
                    entries.flatten().any(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with(prefix) && n.ends_with(suffix) && e.path().join(rest).exists()
                    })
                })
                .unwrap_or(false)
        }
        None if probe.starts_with('/') => Path::new(probe).exists(),
        None => have(probe),
    }
}

fn deps() -> R {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(probe, _)| !installed(probe))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        println!("deps: every package the build, tests and benchmarks use is installed");
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "missing {}: run as root, or install them with `sudo apt-get install -y {}`",
            missing.join(", "),
            missing.join(" ")
        ));
    }
    if !have("apt-get") {
        return Err(format!(
            "missing {} and no apt-get here: install them with your package manager",
            missing.join(", ")
        ));
    }
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .envs(env)
        .status()
        .map_err(|e| format!("apt-get update: {e}"))?;
    if !update.success() {
        return Err("apt-get update failed".into());
    }
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter());
    println!("$ apt-get {}", args.join(" "));
    let st = Command::new("apt-get")
        .args(&args)
        .envs(env)
        .status()
        .map_err(|e| format!("apt-get install: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("apt-get install {} failed", missing.join(" ")))
    }
}

fn build_release() -> R {
    run(
        &cargo(),
        &["build", "--release", "--workspace", "--all-features"],
    )
}

fn bench_binary() -> String {
    root()
        .join("target/release/pfs-bench")
        .to_string_lossy()
        .into_owned()
}

/// `pfs-bench sweep` (sizes 2 B to 8 MiB, 1 to 64 connections) into `out/NAME.json`,
/// drawn as `out/NAME.svg` and `out/NAME.png`.
fn sweep(bin: &str, out: &Path, name: &str, extra: &[&str], quick: bool) -> R {
    let json = out
        .join(format!("{name}.json"))
        .to_string_lossy()
        .into_owned();
    let mut args = vec!["sweep", "--json", &json];
    if quick {
        args.extend(["--duration", "100ms", "--warmup", "20ms"]);
    }
    args.extend(extra);
    run(bin, &args)?;
    for ext in ["svg", "png"] {
        let img = out
            .join(format!("{name}.{ext}"))
            .to_string_lossy()
            .into_owned();
        run(bin, &["plot", &json, "-o", &img])?;
    }
    Ok(())
}

fn bench(quick: bool) -> R {
    let t = Instant::now();
    deps()?;
    build_release()?;
    let bin = bench_binary();
    let out = root().join("results");
    std::fs::create_dir_all(&out).map_err(|e| format!("mkdir results: {e}"))?;
    let run_json = out.join("run.json");
    let cmp_json = out.join("compare.json");
    let duration = if quick { "500ms" } else { "2s" };
    run(
        &bin,
        &[
            "run",
            "--duration",
            duration,
            "--json",
            &run_json.to_string_lossy(),
        ],
    )?;
    // What per-datagram integrity costs (udp, each test with and without).
    let integrity_json = out.join("run-integrity.json");
    run(
        &bin,
        &[
            "run",
            "--backend",
            "udp",
            "--integrity",
            "--duration",
            if quick { "300ms" } else { "2s" },
            "--json",
            &integrity_json.to_string_lossy(),
        ],
    )?;
    // Sending the reduction to the memory against pulling the memory to the reduction.
    let task_json = out.join("task.json");
    run(
        &bin,
        &[
            "task",
            "--size",
            if quick { "64M" } else { "256M" },
            "--pairs",
            if quick { "1" } else { "3" },
            "--json",
            &task_json.to_string_lossy(),
        ],
    )?;
    // rdma: PacketFS against perftest on the same soft-RoCE devices, in the VM.
    let rdma_json = out.join("rdma.json");
    if is_root() {
        run(&rdma_vm(), &["setup"])?;
        run(
            &rdma_vm(),
            &[
                "run",
                "--timeout",
                "900",
                "--rwdir",
                &out.to_string_lossy(),
                "--",
                &bin,
                "rdma",
                "--rounds",
                if quick { "1" } else { "5" },
                "--json",
                &rdma_json.to_string_lossy(),
            ],
        )?;
    } else {
        println!(
            "\nSKIPPED the rdma run (PacketFS against ib_write_bw and ib_read_lat on \
             soft-RoCE): the VM needs root to set up"
        );
    }
    let (pairs, secs) = if quick { ("1", "1s") } else { ("3", "3s") };
    run(
        &bin,
        &[
            "compare",
            "--pairs",
            pairs,
            "--duration",
            secs,
            "--json",
            &cmp_json.to_string_lossy(),
        ],
    )?;
    sweep(&bin, &out, "sweep", &[], quick)?;
    // Two hosts, one NIC each: network namespaces joined by veth, every backend (xdp
    // included) and the baselines, plus bare AF_XDP as the ceiling.
    let two_json = out.join("compare-two-hosts.json");
    if is_root() {
        let topo = root()
            .join("tools/topology.sh")
            .to_string_lossy()
            .into_owned();
        // MTU 1500, then (full run only) jumbo frames, where xdp uses multi-buffer frames.
        let mtus: &[&str] = if quick { &["1500"] } else { &["1500", "9000"] };
        for mtu in mtus {
            let json = if *mtu == "1500" {
                two_json.clone()
            } else {
                out.join(format!("compare-two-hosts-{mtu}.json"))
            };
            run(&topo, &["up", "--mtu", mtu, "--queues", "2"])?;
            let r = run(
                &bin,
                &[
                    "compare",
                    "--two-hosts",
                    "--mtu",
                    mtu,
                    "--pairs",
                    pairs,
                    "--duration",
                    secs,
                    "--json",
                    &json.to_string_lossy(),
                ],
            );
            let r = r.and_then(|()| {
                if *mtu == "1500" {
                    sweep(&bin, &out, "sweep-two-hosts", &["--two-hosts"], quick)
                } else {
                    Ok(())
                }
            });
            if r.is_err() {
                let _ = run(&topo, &["down"]);
            }
            r?;
        }
        let _ = run(&topo, &["down"]);
    } else {
        println!(
            "\nSKIPPED the two-host run (xdp, udp, tcp, iperf3, sockperf, bare AF_XDP over a \
             veth pair): it needs root for network namespaces and XDP"
        );
    }
    println!(
        "\nmain job finished in {:.0} s; JSON in {}, {}, {}, {} and {}; sweeps and their \
         plots (sweep*.json, .svg, .png) in {}",
        t.elapsed().as_secs_f64(),
        run_json.display(),
        integrity_json.display(),
        task_json.display(),
        cmp_json.display(),
        two_json.display(),
        out.display()
    );
    Ok(())
}

struct Phases(Vec<(String, f64, bool)>);

impl Phases {
    fn run(&mut self, name: &str, f: impl FnOnce() -> R) -> R {
        println!("\n=== {name} ===");
        let t = Instant::now();
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "=== {name}: {} in {secs:.1} s ===",
            if r.is_ok() { "ok" } else { "FAILED" }
        );
        self.0.push((name.to_string(), secs, r.is_ok()));
        r
    }

    fn print(&self) {
        println!("\nphase times:");
        let mut total = 0.0;
        for (n, s, ok) in &self.0 {
            println!(
                "  {n:<28} {s:>7.1} s  {}",
                if *ok { "ok" } else { "FAILED" }
            );
            total += s;
        }
        println!("  {:<28} {total:>7.1} s", "total");
    }
}

fn test() -> R {
    let mut p = Phases(Vec::new());
    let r = (|| {
        p.run("deps", deps)?;
        p.run("fmt", || run(&cargo(), &["fmt", "--all", "--", "--check"]))?;
        p.run("shellcheck", || {
            run("shellcheck", &["tools/topology.sh", "tools/rdma-vm.sh"])
        })?;
        p.run("clippy", || {
            run(
                &cargo(),
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--all-features",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        })?;
        p.run("licenses", licenses)?;
        p.run("build (release)", build_release)?;
        // Tier 1 (unit, property) and tier 2 (conformance over every backend that runs
        // here), in release mode so that the large-transfer test moves 1 GiB.
        p.run("tests", || {
            run(
                &cargo(),
                &["test", "--release", "--workspace", "--all-features"],
            )
        })?;
        // Tier 2 over rdma: the conformance suite between two soft-RoCE devices in a VM.
        p.run("rdma (soft-RoCE VM)", rdma_tests)?;
        // Peer kills and packet loss against every backend, as root (2 minutes).
        p.run("chaos", || chaos(CHAOS_SECONDS, is_root()))?;
        p.run("memcheck (valgrind)", memcheck)?;
        p.run("docs", || {
            // Broken intra-doc links and other rustdoc warnings fail the build.
            run_with(
                &cargo(),
                &["doc", "--workspace", "--no-deps", "--all-features"],
                &[("RUSTDOCFLAGS", "-D warnings")],
            )
        })?;
        p.run("fuzz", || fuzz(FUZZ_SECONDS))?;
        p.run("main job (quick)", || bench(true))?;
        Ok(())
    })();
    p.print();
    r
}

/// The path of a test binary of the workspace, built in release mode with every feature
/// (as the tests phase builds them, so nothing is rebuilt).
fn test_binary(name: &str) -> Result<String, String> {
    let out = Command::new(cargo())
        .args([
            "test",
            "--release",
            "--workspace",
            "--all-features",
            "--test",
            name,
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the {name} tests failed ({})", out.status));
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let t = &v["target"];
        if t["name"] == name
            && t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
            && let Some(exe) = v["executable"].as_str()
        {
            return Ok(exe.to_string());
        }
    }
    Err(format!("no test binary named {name}"))
}

fn rdma_vm() -> String {
    root()
        .join("tools/rdma-vm.sh")
        .to_string_lossy()
        .into_owned()
}

/// The conformance suite over rdma (`transport/tests/rdma.rs`) inside the soft-RoCE VM
/// of `tools/rdma-vm.sh`: rxe0 and rxe1 on the two ends of a veth pair. Needs root
/// (packages, the guest kernel); without it, one loud line and nothing else.
fn rdma_tests() -> R {
    if !is_root() {
        println!(
            "SKIPPED: the rdma tests run in a soft-RoCE VM that tools/rdma-vm.sh sets up as \
             root (packages, guest kernel): run as root"
        );
        return Ok(());
    }
    let vm = rdma_vm();
    run(&vm, &["setup"])?;
    let bin = test_binary("rdma")?;
    run(
        &vm,
        &["run", "--timeout", "1200", "--", &bin, "--test-threads=1"],
    )
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS: u64 = 25;

/// The fuzz targets, each a binary of `fuzz/` with a corpus in `fuzz/corpus/NAME`.
const FUZZ_TARGETS: &[&str] = &["wire_decode", "key_parse", "proto_datagrams"];

/// Seconds the chaos test runs in `cargo xtask test`, and by default.
const CHAOS_SECONDS: u64 = 120;

/// The chaos test (`transport/tests/chaos.rs`), built like the tests phase builds (so
/// after it nothing is rebuilt). With `require`, a test that cannot run (not root, no
/// nft, no network namespaces) fails instead of skipping.
fn chaos(secs: u64, require: bool) -> R {
    let secs_text = secs.to_string();
    let mut envs = vec![("PFS_CHAOS_SECS", secs_text.as_str())];
    if require {
        envs.push(("PFS_REQUIRE_ROOT_TESTS", "1"));
    } else {
        println!(
            "not root: the chaos test will say it skipped (it needs a network namespace \
             and nftables)"
        );
    }
    run_with(
        &cargo(),
        &[
            "test",
            "--release",
            "--workspace",
            "--all-features",
            "--test",
            "chaos",
            "--",
            "--ignored",
            "--nocapture",
        ],
        &envs,
    )
}

/// The unsafe-code audit: `transport/tests/memcheck.rs` (single-threaded where it can be:
/// valgrind runs one thread at a time and holds that lock across `io_uring_enter`)
/// under valgrind memcheck, from the release build the tests phase made. Any invalid
/// access, use of an uninitialised value or definitely lost block fails it, as does a
/// failing test. `tools/valgrind.supp` holds the findings outside PacketFS, each
/// justified.
fn memcheck() -> R {
    if !have("valgrind") {
        return Err("valgrind is missing: run `cargo xtask deps` (Debian package valgrind)".into());
    }
    let exe = test_binary("memcheck")?;
    let supp = root().join("tools/valgrind.supp");
    let supp = format!("--suppressions={}", supp.display());
    run(
        "valgrind",
        &[
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--track-origins=yes",
            &supp,
            &exe,
            "--test-threads=1",
        ],
    )
}

/// `--seconds N` (N above 0), or `default` without arguments.
fn seconds(args: &[String], default: u64) -> Result<u64, String> {
    match args {
        [] => Ok(default),
        [flag, n] if flag == "--seconds" || flag == "--long" => n
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("--seconds needs a whole number above 0, not {n:?}")),
        other => Err(format!("unexpected arguments {other:?}")),
    }
}

/// Build the fuzz targets with AFL++ instrumentation and run each from its committed
/// corpus for `secs` seconds. New inputs AFL finds stay in `fuzz/target/afl/NAME`
/// (`cargo afl cmin` them into the corpus to keep them); any crash or hang fails, with
/// the inputs that caused it named.
fn fuzz(secs: u64) -> R {
    if !have("cargo-afl") {
        run(&cargo(), &["install", "cargo-afl", "--locked"])?;
    }
    let dir = root().join("fuzz");
    let status = Command::new(cargo())
        .args(["afl", "build", "--release"])
        .current_dir(&dir)
        .status()
        .map_err(|e| format!("cargo afl build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo afl build failed ({status})"));
    }
    let mut summary = Vec::new();
    for t in FUZZ_TARGETS {
        let out = dir.join("target/afl").join(t);
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(dir.join("target/afl"))
            .map_err(|e| format!("mkdir fuzz/target/afl: {e}"))?;
        let log_path = dir.join("target/afl").join(format!("{t}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let corpus = dir.join("corpus").join(t);
        let bin = dir.join("target/release").join(t);
        let args = [
            "afl",
            "fuzz",
            "-i",
            &corpus.to_string_lossy(),
            "-o",
            &out.to_string_lossy(),
            "-V",
            &secs.to_string(),
            "--",
            &bin.to_string_lossy(),
        ]
        .map(|s| s.to_string());
        println!("$ cargo {}", args.join(" "));
        let st = Command::new(cargo())
            .args(&args)
            .envs([
                ("AFL_NO_UI", "1"),
                ("AFL_SKIP_CPUFREQ", "1"),
                ("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1"),
                ("AFL_NO_AFFINITY", "1"),
                ("AFL_QUIET", "1"),
            ])
            .stdout(log)
            .stderr(log2)
            .status()
            .map_err(|e| format!("cargo afl fuzz: {e}"))?;
        if !st.success() {
            // AFL++ prints its reasons on stdout, among progress lines.
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let why: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("[-]") || l.contains("ABORT"))
                .collect();
            return Err(format!(
                "afl-fuzz on {t} failed ({st}): {} (whole log: {})",
                why.join(" / "),
                log_path.display()
            ));
        }
        let stats = std::fs::read_to_string(out.join("default/fuzzer_stats")).unwrap_or_default();
        let stat = |k: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(k)?.trim_start().strip_prefix(':'))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let found = |sub: &str| -> Vec<String> {
            std::fs::read_dir(out.join("default").join(sub))
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.path().display().to_string())
                        .filter(|p| !p.ends_with("README.txt"))
                        .collect()
                })
                .unwrap_or_default()
        };
        let (crashes, hangs) = (found("crashes"), found("hangs"));
        let line = format!(
            "{t}: {} cases in {secs} s, {} paths in the queue, {} crashes, {} hangs",
            stat("execs_done"),
            stat("corpus_count"),
            crashes.len(),
            hangs.len()
        );
        println!("{line}");
        summary.push(line);
        if !crashes.is_empty() || !hangs.is_empty() {
            return Err(format!(
                "fuzzing {t} found inputs that crash or hang: {} (run the target on one: \
                 fuzz/target/release/{t} < FILE)",
                crashes
                    .iter()
                    .chain(&hangs)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    println!("\nfuzz summary:\n  {}", summary.join("\n  "));
    Ok(())
}

/// SPDX identifiers whose terms allow linking into a MIT OR Apache-2.0 project.
const ALLOWED: &[&str] = &[
    "MIT",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "ISC",
    "Zlib",
    "0BSD",
    "CC0-1.0",
    "Unlicense",
    "BSL-1.0",
    "Unicode-3.0",
    "Unicode-DFS-2016",
    // File-level copyleft: using an unmodified dependency puts no obligation on our code.
    "MPL-2.0",
];

/// Whether an SPDX expression (with `OR`, `AND`, `WITH`, parentheses, and the legacy
/// `/` for OR) can be satisfied with allowed licences only.
fn satisfiable(expr: &str) -> bool {
    let expr = expr.replace('/', " OR ");
    let tokens: Vec<String> = expr
        .replace('(', " ( ")
        .replace(')', " ) ")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut pos = 0;
    let r = parse_or(&tokens, &mut pos);
    r.unwrap_or(false) && pos == tokens.len()
}

fn parse_or(t: &[String], pos: &mut usize) -> Option<bool> {
    let mut v = parse_and(t, pos)?;
    while t.get(*pos).map(String::as_str) == Some("OR") {
        *pos += 1;
        v |= parse_and(t, pos)?;
    }
    Some(v)
}

fn parse_and(t: &[String], pos: &mut usize) -> Option<bool> {
    let mut v = parse_atom(t, pos)?;
    while t.get(*pos).map(String::as_str) == Some("AND") {
        *pos += 1;
        v &= parse_atom(t, pos)?;
    }
    Some(v)
}

fn parse_atom(t: &[String], pos: &mut usize) -> Option<bool> {
    let tok = t.get(*pos)?.clone();
    *pos += 1;
    if tok == "(" {
        let v = parse_or(t, pos)?;
        if t.get(*pos).map(String::as_str) != Some(")") {
            return None;
        }
        *pos += 1;
        return Some(v);
    }
    let mut id = tok;
    if t.get(*pos).map(String::as_str) == Some("WITH") {
        id = format!("{id} WITH {}", t.get(*pos + 1)?);
        *pos += 2;
    }
    Some(ALLOWED.contains(&id.as_str()) || ALLOWED.contains(&id.split(" WITH ").next()?))
}

/// The SPDX id of a `license-file` whose text is one of the allowed licences.
fn license_file_text(p: &serde_json::Value) -> Option<&'static str> {
    let file = p["license_file"].as_str()?;
    let dir = Path::new(p["manifest_path"].as_str()?).parent()?;
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    let head = text.trim_start();
    if head.starts_with("MIT License")
        && text.contains("Permission is hereby granted, free of charge")
    {
        Some("MIT")
    } else if head.starts_with("Apache License") && text.contains("Version 2.0") {
        Some("Apache-2.0")
    } else {
        None
    }
}

fn licenses() -> R {
    let out = Command::new(cargo())
        .args(["metadata", "--format-version", "1", "--all-features"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata JSON: {e}"))?;
    let mut bad = Vec::new();
    let mut n = 0;
    for p in v["packages"].as_array().into_iter().flatten() {
        n += 1;
        let name = p["name"].as_str().unwrap_or("?");
        let ver = p["version"].as_str().unwrap_or("?");
        match p["license"].as_str() {
            Some(l) if satisfiable(l) => {}
            Some(l) => bad.push(format!("{name} {ver}: {l}")),
            None => {
                // Workspace crates inherit the workspace licence; others must declare one.
                if p["source"].is_null() {
                    continue;
                }
                // A licence given as a file only (rdma-sys): recognise the text.
                match license_file_text(p) {
                    Some(id) => {
                        println!("licenses: {name} {ver} declares its licence as a file: {id}")
                    }
                    None => bad.push(format!("{name} {ver}: no licence declared")),
                }
            }
        }
    }
    if bad.is_empty() {
        println!("licenses: all {n} packages are under licences compatible with MIT OR Apache-2.0");
        Ok(())
    } else {
        Err(format!(
            "dependencies with licences outside the allowed list:\n  {}",
            bad.join("\n  ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::satisfiable;

    #[test]
    fn spdx_expressions() {
        assert!(satisfiable("MIT"));
        assert!(satisfiable("MIT OR Apache-2.0"));
        assert!(satisfiable("MIT/Apache-2.0"));
        assert!(satisfiable("(MIT OR Apache-2.0) AND Unicode-3.0"));
        assert!(satisfiable("Apache-2.0 WITH LLVM-exception OR Apache-2.0"));
        assert!(satisfiable("LGPL-2.1-only OR BSD-2-Clause"));
        assert!(!satisfiable("LGPL-2.1-only"));
        assert!(!satisfiable("GPL-3.0-only"));
        assert!(!satisfiable("MIT AND GPL-2.0-only"));
        assert!(satisfiable("GPL-2.0-only OR MIT"));
        assert!(!satisfiable("(MIT"));
        assert!(!satisfiable(""));
    }
}
