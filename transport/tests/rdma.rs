//! The conformance suite over the `rdma` backend: RC queue pairs between two soft-RoCE
//! devices (rxe0 and rxe1 on the two ends of a veth pair), so every operation crosses a
//! link rather than rxe's loopback path. The devices exist inside the VM of
//! `tools/rdma-vm.sh`, which `cargo xtask test` boots for this binary; anywhere else the
//! binary says so in one line and runs nothing.
#![cfg(feature = "rdma")]

mod conformance;

use std::sync::OnceLock;

use conformance::{Fixture, Mode};

/// The server's address: the second rxe device's (`PFS_RXE_ADDRS`, set inside the VM).
fn server_ip() -> Option<&'static str> {
    static IP: OnceLock<Option<String>> = OnceLock::new();
    IP.get_or_init(|| {
        let addrs = std::env::var("PFS_RXE_ADDRS").ok()?;
        addrs.split_whitespace().nth(1).map(str::to_string)
    })
    .as_deref()
}

fn listen() -> &'static str {
    static L: OnceLock<String> = OnceLock::new();
    L.get_or_init(|| match server_ip() {
        Some(ip) => format!("rdma://{ip}:0"),
        None => {
            // What can be checked without devices is checked before leaving.
            bad_input::check_no_device_refusal();
            // Past the harness's capture (which exit would discard).
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIPPED: rdma tests need RDMA devices (PFS_RXE_ADDRS is not set); \
                 `cargo xtask test` runs them inside the soft-RoCE VM: \
                 tools/rdma-vm.sh run -- <this test binary>"
            );
            // Run nothing: every conformance function needs the devices.
            std::process::exit(0);
        }
    })
}

fn rdma(mode: Mode) -> Fixture {
    Fixture {
        name: "rdma",
        listen: listen(),
        mode,
        // Sized for soft-RoCE under TCG (tens of MiB/s).
        large: 64 << 20,
        raw_garbage: |_, _| None,
        tweak: |c| c,
        enter: conformance::stay,
        dial: conformance::same_address,
        serial: false,
    }
}

fn rdma_authenticated(mode: Mode) -> Fixture {
    Fixture {
        tweak: |c| {
            c.secret(pfs_transport::Secret::from_bytes(b"conformance-suite-secret").unwrap())
        },
        ..rdma(mode)
    }
}

conformance_suite!(thread_block, super::rdma(super::Mode::ThreadBlock));
conformance_suite!(caller_busy, super::rdma(super::Mode::CallerBusy));
conformance_suite!(
    authenticated_busy,
    super::rdma_authenticated(super::Mode::ThreadBusy)
);

// ---- bad input: each a one-line error naming the fix ----

mod bad_input {
    use std::time::{Duration, Instant};

    use pfs_transport::{Endpoint, EndpointConfig, Error, Rights};

    /// Without RDMA devices (any machine but the VM) rdma is refused with the way to get
    /// one; with them, this checks nothing more.
    #[test]
    fn no_device_is_refused_with_the_fix() {
        check_no_device_refusal();
    }

    pub(super) fn check_no_device_refusal() {
        let devices = std::fs::read_dir("/sys/class/infiniband")
            .map(|d| d.count())
            .unwrap_or(0);
        if std::env::var_os("PFS_RXE_ADDRS").is_some() || devices > 0 {
            return;
        }
        let e = Endpoint::bind(EndpointConfig::new().listen("rdma://127.0.0.1:0").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no RDMA device") && e.contains("rdma link add"),
            "{e}"
        );
        let c = Endpoint::bind(EndpointConfig::new()).unwrap();
        let e = c.connect("rdma://127.0.0.1:9").unwrap_err().to_string();
        assert!(e.contains("no RDMA device"), "{e}");
    }

    fn server_ip() -> Option<String> {
        super::server_ip().map(str::to_string)
    }

    #[test]
    fn an_address_without_a_device_names_the_fix() {
        let Some(ip) = server_ip() else { return };
        // In the devices' subnet, but nobody's address.
        let stranger = match ip.rsplit_once('.') {
            Some((net, _)) => format!("{net}.250"),
            None => return,
        };
        let e = Endpoint::bind(
            EndpointConfig::new()
                .listen(&format!("rdma://{stranger}:0"))
                .unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rdma_bind_addr") && e.contains("no RDMA device has the address"),
            "{e}"
        );
    }

    /// An operation that cannot complete fails with `Timeout` by its deadline: the
    /// engine stamps it (op_timeout from the first timer tick that sees it), so it may
    /// fail up to a tick late, never early.
    #[test]
    fn an_operation_that_cannot_complete_times_out_by_its_deadline() {
        let Some(ip) = server_ip() else { return };
        let timeout = Duration::from_millis(400);
        // The receiver queues one message and reads none: the second is never
        // acknowledged, so its send cannot complete.
        let mut scfg = EndpointConfig::new()
            .listen(&format!("rdma://{ip}:0"))
            .unwrap();
        scfg.max_incoming = 1;
        let server = Endpoint::bind(scfg).unwrap();
        let client = Endpoint::bind(
            EndpointConfig::new()
                .progress(pfs_transport::Progress::Caller)
                .wait_mode(pfs_transport::WaitMode::BusyPoll)
                .op_timeout(timeout),
        )
        .unwrap();
        let conn = client.connect_addr(&server.local_addrs()[0]).unwrap();
        let _peer = server.accept_timeout(Duration::from_secs(10)).unwrap();
        conn.send(b"queued").unwrap().wait().unwrap();
        let t = Instant::now();
        let e = conn
            .send(b"never acknowledged")
            .unwrap()
            .wait_timeout(timeout + Duration::from_secs(3))
            .expect("no timeout by op_timeout + 3 s")
            .unwrap_err();
        let took = t.elapsed();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "timed out after {took:?} (op_timeout {timeout:?})"
        );
        // The connection itself is fine (the message waits in RNR retries until the
        // receiver has room).
        assert!(!conn.is_closed());
    }

    #[test]
    fn connecting_where_nothing_listens_fails_at_once() {
        let Some(ip) = server_ip() else { return };
        let c =
            Endpoint::bind(EndpointConfig::new().connect_timeout(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        let e = c.connect(&format!("rdma://{ip}:9")).unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        let s = e.to_string();
        assert!(
            matches!(e, Error::Io { .. }) && s.contains("is a PacketFS rdma endpoint listening"),
            "{s}"
        );
    }

    #[test]
    fn a_secret_on_one_side_only_is_an_authentication_error() {
        let Some(ip) = server_ip() else { return };
        let secret = pfs_transport::Secret::from_bytes(b"rdma-bad-input-secret").unwrap();
        let s = Endpoint::bind(
            EndpointConfig::new()
                .listen(&format!("rdma://{ip}:0"))
                .unwrap()
                .secret(secret.clone()),
        )
        .unwrap();
        let addr = s.local_addrs()[0].to_string();
        let c = Endpoint::bind(EndpointConfig::new()).unwrap();
        let e = c.connect(&addr).unwrap_err();
        assert!(matches!(e, Error::AuthFailed(_)), "{e}");
        assert!(e.to_string().contains("cluster secret"), "{e}");
        let other = pfs_transport::Secret::from_bytes(b"rdma-another-secret!!").unwrap();
        let c = Endpoint::bind(EndpointConfig::new().secret(other)).unwrap();
        let e = c.connect(&addr).unwrap_err();
        assert!(
            matches!(e, Error::AuthFailed(_)) && e.to_string().contains("different secrets"),
            "{e}"
        );
        assert!(s.stats().auth_failures >= 1);
    }

    const MEMLOCK_CHILD: &str = "PFS_RDMA_MEMLOCK_CHILD";

    /// Not a test: the body of `registration_beyond_the_memlock_limit_names_the_fix`,
    /// run in a child process without CAP_IPC_LOCK and with a 64 KiB memlock limit.
    #[test]
    #[ignore]
    fn memlock_child() {
        if std::env::var_os(MEMLOCK_CHILD).is_none() {
            return;
        }
        let ip = server_ip().expect("inside the VM");
        let r = (|| {
            let s = Endpoint::bind(EndpointConfig::new().listen(&format!("rdma://{ip}:0"))?)?;
            let c = Endpoint::bind(EndpointConfig::new())?;
            let conn = c.connect_addr(&s.local_addrs()[0])?;
            let target = s.alloc_region(16 << 20, Rights::ALL)?;
            let key = target.key(Rights::ALL)?;
            let local = c.alloc_region(16 << 20, Rights::ALL)?;
            conn.write(&local, 0, &key, 0, 16 << 20)?.wait()
        })();
        match r {
            Ok(()) => println!("MEMLOCK-RESULT ok"),
            Err(e) => println!("MEMLOCK-RESULT {e}"),
        }
    }

    #[test]
    fn registration_beyond_the_memlock_limit_names_the_fix() {
        if server_ip().is_none() {
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new("setpriv")
            .args([
                "--bounding-set=-ipc_lock",
                "--inh-caps=-ipc_lock",
                "prlimit",
            ])
            .arg("--memlock=65536:65536")
            .arg(&exe)
            .args([
                "bad_input::memlock_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(MEMLOCK_CHILD, "1")
            .output()
            .expect("run setpriv and prlimit (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.split_once("MEMLOCK-RESULT ").map(|(_, r)| r.to_string()))
            .unwrap_or_else(|| panic!("no result from the child: {text}"));
        assert!(
            line.contains("ibv_reg_mr") && line.contains("ulimit -l"),
            "expected a registration error naming the fix, got: {line}"
        );
    }
}

// ---- the registration cache ----

mod registration_cache {
    use std::time::{Duration, Instant};

    use pfs_transport::{Endpoint, EndpointConfig, Progress, Rights, WaitMode};

    /// This process's pinned memory (`VmPin`), in bytes.
    fn pinned() -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        s.lines()
            .find_map(|l| l.strip_prefix("VmPin:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmPin in /proc/self/status")
            * 1024
    }

    /// A region used as the source of writes is registered once and cached; once the
    /// region is dropped, the engine's next pass releases the registration (and the
    /// pinned memory with it), on an endpoint its caller drives as on one with a
    /// progress thread. Held until a timer tick instead, a caller that keeps submitting
    /// (whose operations complete inside the post, so it runs few passes) pinned every
    /// source region it ever used.
    #[test]
    fn a_dropped_regions_registration_is_released() {
        let Some(ip) = super::server_ip() else { return };
        let s = Endpoint::bind(
            EndpointConfig::new()
                .listen(&format!("rdma://{ip}:0"))
                .unwrap(),
        )
        .unwrap();
        let target = s.alloc_region(1 << 20, Rights::ALL).unwrap();
        let key = target.key(Rights::ALL).unwrap();
        for caller_drives in [true, false] {
            let cfg = if caller_drives {
                EndpointConfig::new()
                    .progress(Progress::Caller)
                    .wait_mode(WaitMode::BusyPoll)
            } else {
                EndpointConfig::new()
            };
            let c = Endpoint::bind(cfg).unwrap();
            let conn = c.connect_addr(&s.local_addrs()[0]).unwrap();
            // The grant and a small source: registered before the baseline.
            let small = c.alloc_region(4096, Rights::ALL).unwrap();
            conn.write(&small, 0, &key, 0, 4096)
                .unwrap()
                .wait()
                .unwrap();
            let base = pinned();
            for round in 0..4 {
                let src = c.alloc_region(16 << 20, Rights::ALL).unwrap();
                // One write on an idle connection, then 64 KiB writes 32 at a time.
                conn.write(&src, 0, &key, 0, 4096).unwrap().wait().unwrap();
                let mut ops: std::collections::VecDeque<pfs_transport::Op<()>> =
                    std::collections::VecDeque::new();
                for i in 0..128u64 {
                    if ops.len() == 32
                        && let Some(o) = ops.pop_front()
                    {
                        o.wait().unwrap();
                    }
                    let at = (i % 16) << 16;
                    ops.push_back(conn.write(&src, at, &key, at, 1 << 16).unwrap());
                }
                ops.into_iter().for_each(|o| o.wait().unwrap());
                assert!(
                    pinned() >= base + (16 << 20),
                    "round {round}: the write did not register its 16 MiB source"
                );
                drop(src);
                if caller_drives {
                    // The next pass handles the drop.
                    c.progress();
                    assert!(
                        pinned() <= base + (1 << 20),
                        "round {round}: a dropped region's registration still pins {} MiB \
                         after the caller's next pass",
                        (pinned() - base) >> 20
                    );
                    continue;
                }
                let t = Instant::now();
                while pinned() > base + (1 << 20) {
                    assert!(
                        t.elapsed() < Duration::from_secs(5),
                        "round {round}: a dropped region's registration still pins {} MiB \
                         5 s later (progress thread)",
                        (pinned() - base) >> 20
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
}

/// The target endpoint, its region and a key to it, the client and its connection.
type Pair = (
    pfs_transport::Endpoint,
    pfs_transport::Region,
    pfs_transport::RegionKey,
    pfs_transport::Endpoint,
    pfs_transport::Connection,
);

/// A server (progress thread) with a target region of `len` bytes and its key, and a
/// client (progress thread) connected to it; `None` outside the VM.
fn connected_pair(len: usize) -> Option<Pair> {
    connected_pair_with(len, pfs_transport::EndpointConfig::new())
}

/// [`connected_pair`] with the client's configuration.
fn connected_pair_with(len: usize, client: pfs_transport::EndpointConfig) -> Option<Pair> {
    use pfs_transport::{Endpoint, EndpointConfig, Rights};
    let ip = server_ip()?;
    let s = Endpoint::bind(
        EndpointConfig::new()
            .listen(&format!("rdma://{ip}:0"))
            .unwrap(),
    )
    .unwrap();
    let target = s.alloc_region(len, Rights::ALL).unwrap();
    let key = target.key(Rights::ALL).unwrap();
    let c = Endpoint::bind(client).unwrap();
    let conn = c.connect_addr(&s.local_addrs()[0]).unwrap();
    Some((s, target, key, c, conn))
}

mod idle {
    use std::time::Duration;

    use pfs_transport::Rights;

    /// Times this process's rdma progress threads have gone to sleep, summed
    /// (`voluntary_ctxt_switches` of each thread named `pfs-rdma`).
    fn progress_thread_sleeps() -> u64 {
        let mut n = 0;
        for t in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task") {
            let p = t.expect("task entry").path();
            let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            if comm.trim() != "pfs-rdma" {
                continue;
            }
            let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
            n += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        n
    }

    /// Engines with progress threads that sleep, connected and with nothing under way (a
    /// target whose memory the peer accesses through the NIC alone), wake for events,
    /// not on the 5 ms timer tick: a few times a second each, where the tick woke each
    /// 200 times. And they still answer at once when there is work.
    #[test]
    fn an_idle_engine_sleeps_until_there_is_work() {
        let Some((_s, _target, key, c, conn)) = super::connected_pair(1 << 20) else {
            return;
        };
        let src = c.alloc_region(1 << 16, Rights::ALL).unwrap();
        for _ in 0..3 {
            conn.write(&src, 0, &key, 0, 1 << 16)
                .unwrap()
                .wait()
                .unwrap();
            // The ticks after the work.
            std::thread::sleep(Duration::from_millis(100));
            let before = progress_thread_sleeps();
            std::thread::sleep(Duration::from_secs(1));
            let woke = progress_thread_sleeps() - before;
            assert!(
                woke < 100,
                "two idle engines went to sleep {woke} times in 1 s: something still wakes \
                 them on a timer"
            );
        }
        assert_eq!(
            conn.read(&src, 0, &key, 0, 1 << 16)
                .unwrap()
                .wait()
                .unwrap(),
            ()
        );
    }
}

mod soft_roce {
    use pfs_transport::Rights;

    /// Retransmissions the client's device (the first of `PFS_RXE_DEVS`) made because
    /// its ACK timer fired: all its retries less those a NAK asked for.
    fn timeouts() -> u64 {
        let dev = std::env::var("PFS_RXE_DEVS").expect("PFS_RXE_DEVS in the VM");
        let dev = dev.split_whitespace().next().expect("a device").to_string();
        let read = |c: &str| -> u64 {
            let p = format!("/sys/class/infiniband/{dev}/ports/1/hw_counters/{c}");
            std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("{p}: {e}"))
                .trim()
                .parse()
                .expect("a counter")
        };
        read("completer_retry_err").saturating_sub(read("rcvd_seq_err"))
    }

    /// Long reads go out as work requests soft-RoCE answers without stalling: in Linux
    /// 6.1 a READ whose response runs to 1,024 packets waits for the ACK timeout every
    /// time (1 MiB at the VM's 1,024-byte path MTU; perftest's `ib_read_bw -s 1048576`
    /// does the same), which made 64 MiB of reads take a minute more with a 1 s
    /// timeout, and with a 67 ms one could retransmit until the reads' deadline.
    #[test]
    fn long_reads_do_not_wait_for_the_ack_timeout() {
        let Some((_s, _target, key, c, conn)) = super::connected_pair(32 << 20) else {
            return;
        };
        let back = c.alloc_region(32 << 20, Rights::ALL).unwrap();
        let before = timeouts();
        let ops: Vec<_> = (0..4u64)
            .map(|i| conn.read(&back, i << 23, &key, i << 23, 8 << 20).unwrap())
            .collect();
        pfs_transport::wait_all(ops).unwrap();
        // (A NAK that finds a retry under way adds to one counter only.)
        let n = timeouts().saturating_sub(before);
        // One stall per MiB was 32 here; a stray one (a packet reordered at the end of
        // a burst) is allowed.
        assert!(
            n < 4,
            "32 MiB of reads waited for the ACK timeout {n} times"
        );
    }

    /// A read that times out part-way posts nothing more: its caller has had `Timeout`
    /// and may use its buffer again. What was posted before (the posting window, 4 MiB
    /// of reads at most) completes, and then the buffer stays as it is. 64 MiB takes
    /// 2-4 s here (15-30 MiB/s under TCG), well past the 1.5 s deadline.
    #[test]
    fn a_read_that_timed_out_posts_no_more() {
        use std::time::Duration;

        use pfs_transport::{EndpointConfig, Error};
        let len = 64 << 20;
        let client = EndpointConfig::new().op_timeout(Duration::from_millis(1500));
        let Some((_s, target, key, c, conn)) = super::connected_pair_with(len, client) else {
            return;
        };
        target.write_at(0, &vec![0xa5; len]).unwrap();
        let back = c.alloc_region(len, Rights::ALL).unwrap();
        // The key's grant and the buffer's registration, before the timed read.
        conn.read(&back, len as u64 - 8, &key, 0, 8)
            .unwrap()
            .wait()
            .unwrap();
        let filled = |r: &pfs_transport::Region| {
            r.to_vec(0, len - 8)
                .unwrap()
                .iter()
                .filter(|&&b| b != 0)
                .count()
        };
        match conn.read(&back, 0, &key, 0, len as u64 - 8).unwrap().wait() {
            Err(Error::Timeout { .. }) => {}
            other => panic!("64 MiB read in 1.5 s under TCG: {other:?}"),
        }
        std::thread::sleep(Duration::from_secs(1));
        let a = filled(&back);
        std::thread::sleep(Duration::from_secs(2));
        let b = filled(&back);
        assert_eq!(
            a, b,
            "the read went on after its Timeout: {a} bytes, then {b}"
        );
        assert!(b < len - 8, "all of it arrived: {b} bytes");
        conn.read(&back, 0, &key, 0, 8)
            .unwrap()
            .wait()
            .expect("the connection goes on");
    }
}
