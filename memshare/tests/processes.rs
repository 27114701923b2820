//! Three node processes on loopback (this test binary re-executed in node mode) hold a
//! striped array; this process joins as a client, checks map_reduce against a local
//! computation, then kills one node with SIGKILL in the middle of a workload: the
//! operations on its stripe fail with a clear error within the deadline, failure
//! detection marks it down within its bound, and the work on the other stripes goes on.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use pfs_memshare::builtin::{self, HISTOGRAM_U64, SUM_U64};
use pfs_memshare::{Error, FailureDetection, Node, NodeConfig};

/// Set in a node process: the seed address, or `-` for the first node.
const NODE_ENV: &str = "PFS_MEMSHARE_TEST_NODE";
/// Set in a node process: the backend scheme to listen on.
const SCHEME_ENV: &str = "PFS_MEMSHARE_TEST_SCHEME";
/// Set in a node process: the IP address to listen on (default 127.0.0.1).
const HOST_ENV: &str = "PFS_MEMSHARE_TEST_HOST";
/// Set in the process that runs the network-namespace variant inside `unshare -n`.
const DRIVER_ENV: &str = "PFS_MEMSHARE_TEST_NETNS_DRIVER";
const NODE_LINE: &str = "PFS-MEMSHARE-NODE ";
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How late past its deadline an operation may fail on a loaded two-core machine.
const SLACK: Duration = Duration::from_secs(2);
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Node processes exit on their own after this long, whatever happens to the test.
const NODE_LIFETIME: Duration = Duration::from_secs(120);

fn fd() -> FailureDetection {
    FailureDetection {
        probe_period: Duration::from_millis(400),
        probe_rtt: Duration::from_millis(200),
        suspect_to_down: Duration::from_millis(800),
    }
}

fn config(scheme: &str, host: &str, seed: Option<&str>) -> NodeConfig {
    let mut c = NodeConfig::new(format!("{scheme}://{host}:0"))
        .failure_detection(fd())
        .op_timeout(OP_TIMEOUT)
        .task_timeout(Duration::from_secs(10));
    if let Some(s) = seed {
        c = c.seed(s);
    }
    c
}

fn node_main(seed: &str) -> ! {
    let scheme = std::env::var(SCHEME_ENV).unwrap_or_else(|_| "tcp".into());
    let host = std::env::var(HOST_ENV).unwrap_or_else(|_| "127.0.0.1".into());
    let node =
        Node::start(config(&scheme, &host, (seed != "-").then_some(seed))).expect("node start");
    builtin::register(&node);
    println!("{NODE_LINE}{} {:x}", node.addr(), node.id());
    // Live until the parent closes stdin (or dies), or the lifetime passes.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(NODE_LIFETIME);
    drop(node);
    std::process::exit(0)
}

struct Proc {
    child: Child,
    addr: String,
    id: u64,
}

/// Where the nodes run: loopback, or one network namespace per node.
struct Net {
    /// Address each node listens on.
    node_hosts: Vec<String>,
    /// Address this process's client node listens on.
    client_host: String,
    /// Network namespace of each node (none: this process's).
    namespaces: Vec<Option<String>>,
}

impl Net {
    fn loopback() -> Net {
        Net {
            node_hosts: vec!["127.0.0.1".into(); 3],
            client_host: "127.0.0.1".into(),
            namespaces: vec![None; 3],
        }
    }
}

fn spawn(test: &str, scheme: &str, seed: &str, host: &str, netns: Option<&str>) -> Proc {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(NODE_ENV, seed)
        .env(SCHEME_ENV, scheme)
        .env(HOST_ENV, host)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            // The test harness may have printed "test … ... " on the same line.
            if let Some(at) = line.find(NODE_LINE) {
                let _ = tx.send(line[at + NODE_LINE.len()..].trim().to_string());
            }
        }
    });
    let line = rx
        .recv_timeout(START_TIMEOUT)
        .expect("node process did not start");
    let (addr, id) = line.split_once(' ').unwrap();
    Proc {
        child,
        addr: addr.to_string(),
        id: u64::from_str_radix(id, 16).unwrap(),
    }
}

fn values(n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 44) % 1000)
        .collect()
}

#[test]
fn three_node_processes_and_a_sigkill() {
    if let Ok(seed) = std::env::var(NODE_ENV) {
        node_main(&seed);
    }
    scenario(
        "three_node_processes_and_a_sigkill",
        "tcp",
        &Net::loopback(),
    );
}

#[test]
fn three_node_processes_and_a_sigkill_over_udp() {
    if let Ok(seed) = std::env::var(NODE_ENV) {
        node_main(&seed);
    }
    scenario(
        "three_node_processes_and_a_sigkill_over_udp",
        "udp",
        &Net::loopback(),
    );
}

/// The same scenario with every node process in its own network namespace ("host"),
/// joined by veth pairs to a bridge in a private namespace where this test's client
/// runs (the test re-executes itself under `unshare -n`, so nothing touches the host's
/// network). Needs root, `unshare`, `nsenter` and `ip`; without root it prints one line
/// and passes, unless `PFS_REQUIRE_ROOT_TESTS=1`.
#[test]
fn three_node_processes_in_network_namespaces() {
    const TEST: &str = "three_node_processes_in_network_namespaces";
    if let Ok(seed) = std::env::var(NODE_ENV) {
        node_main(&seed);
    }
    if std::env::var(DRIVER_ENV).is_ok() {
        let topo = Topology::create().expect("building the namespaces");
        scenario(TEST, "tcp", &topo.net);
        return;
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let tools = ["unshare", "nsenter", "ip"]
        .iter()
        .all(|t| Command::new(t).arg("--version").output().is_ok());
    if !is_root || !tools {
        let why = if is_root {
            "unshare, nsenter or ip is missing (util-linux, iproute2)"
        } else {
            "it needs root (network namespaces)"
        };
        assert!(
            std::env::var("PFS_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
            "{TEST}: {why}"
        );
        eprintln!("SKIPPED {TEST}: {why}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let status = Command::new("unshare")
        .arg("-n")
        .arg(exe)
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(DRIVER_ENV, "1")
        // Its own test harness lines would read as a second result; failures and the
        // timings go to stderr.
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the namespace run failed: {status}");
}

/// Namespaces `pfsms-PID-i` (198.18.1.i+1/24 on a veth), the other ends on a bridge
/// (198.18.1.254) in the current namespace; removed on drop.
struct Topology {
    net: Net,
    names: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Topology {
    fn create() -> Result<Topology, String> {
        let mut t = Topology {
            net: Net {
                node_hosts: Vec::new(),
                client_host: "198.18.1.254".into(),
                namespaces: Vec::new(),
            },
            names: Vec::new(),
        };
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", "pfsms-br", "type", "bridge"])?;
        ip(&["addr", "add", "198.18.1.254/24", "dev", "pfsms-br"])?;
        ip(&["link", "set", "pfsms-br", "up"])?;
        for i in 0..3 {
            let ns = format!("pfsms-{}-{i}", std::process::id());
            ip(&["netns", "add", &ns])?;
            t.names.push(ns.clone());
            let (host_end, ns_end) = (format!("pfsms-h{i}"), format!("pfsms-n{i}"));
            let addr = format!("198.18.1.{}", i + 1);
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end,
            ])?;
            ip(&["link", "set", &ns_end, "netns", &ns])?;
            ip(&["link", "set", &host_end, "master", "pfsms-br"])?;
            ip(&["link", "set", &host_end, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &ns_end,
            ])?;
            ip(&["-n", &ns, "link", "set", &ns_end, "up"])?;
            t.net.node_hosts.push(addr);
            t.net.namespaces.push(Some(ns));
        }
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn scenario(test: &str, scheme: &str, net: &Net) {
    let t0 = Instant::now();
    let first = spawn(
        test,
        scheme,
        "-",
        &net.node_hosts[0],
        net.namespaces[0].as_deref(),
    );
    let mut procs = vec![first];
    for i in 1..3 {
        let seed = procs[0].addr.clone();
        procs.push(spawn(
            test,
            scheme,
            &seed,
            &net.node_hosts[i],
            net.namespaces[i].as_deref(),
        ));
    }
    let client = Node::start(config(scheme, &net.client_host, Some(&procs[0].addr))).unwrap();
    client.wait_for_members(3, START_TIMEOUT).unwrap();

    // A striped array over the three node processes; map_reduce against local sums.
    let n = 300_000u64;
    let hosts: Vec<u64> = procs.iter().map(|p| p.id).collect();
    let arr = client.create_striped_on("data", n * 8, &hosts).unwrap();
    let vals = values(n);
    arr.write_u64s(0, &vals).unwrap();
    let sum = arr
        .map_reduce(SUM_U64, &[], 0u64, |a, r| a + builtin::decode_u64s(&r)[0])
        .unwrap();
    assert_eq!(sum, vals.iter().sum::<u64>());
    let hist = arr
        .map_reduce(
            HISTOGRAM_U64,
            &builtin::histogram_args(0, 1000, 10),
            vec![0u64; 10],
            |mut acc, r| {
                for (a, c) in acc.iter_mut().zip(builtin::decode_u64s(&r)) {
                    *a += c;
                }
                acc
            },
        )
        .unwrap();
    let mut expect = vec![0u64; 10];
    for v in &vals {
        expect[(*v / 100) as usize] += 1;
    }
    assert_eq!(hist, expect);

    // A workload on every stripe: write, read back, verify, count.
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let (arr, stop, counts) = (arr.clone(), stop.clone(), counts.clone());
            std::thread::spawn(move || -> Result<(), (Error, Instant)> {
                let stripe = &arr.stripes()[i];
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let block: Vec<u64> = (0..512).map(|j| k * 1000 + j).collect();
                    let r = stripe
                        .write_u64s(0, &block)
                        .and_then(|()| stripe.read_u64s(0, 512))
                        .and_then(|got| {
                            assert_eq!(got, block, "stripe {i} read back wrong data");
                            stripe.fetch_add(8 * 600, 1)
                        });
                    if let Err(e) = r {
                        return Err((e, Instant::now()));
                    }
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let victim = procs.remove(2);
    let mut victim_child = victim.child;
    victim_child.kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    let _ = victim_child.wait();
    let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();

    // Failure detection marks it down within its documented bound.
    let bound = fd().detection_bound(4) + SLACK;
    while !client.is_down(victim.id) {
        assert!(
            killed_at.elapsed() < bound,
            "not marked down within {bound:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let detected = killed_at.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let after: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    // The victim's stripe failed, clearly and in time.
    match &results[2] {
        Err((e, at)) => {
            // On tcp the reset connection fails the operation at once; on udp it fails
            // at its deadline, or as soon as failure detection marks the node down.
            let clear = match e {
                Error::OwnerDown { name, owner, .. } => name == "data#2" && *owner == victim.id,
                Error::Timeout { what, .. } => scheme == "udp" && what.contains("data#2"),
                _ => false,
            };
            assert!(clear, "{e:?}");
            assert!(
                at.saturating_duration_since(killed_at) < OP_TIMEOUT + SLACK,
                "the failure took {:?}",
                at.saturating_duration_since(killed_at)
            );
            eprintln!(
                "stripe 2 failed {:?} after the kill: {e}",
                at.saturating_duration_since(killed_at)
            );
        }
        Ok(()) => panic!("operations on the killed node's stripe kept succeeding"),
    }
    // The others kept working after the kill.
    for i in 0..2 {
        assert!(results[i].is_ok(), "stripe {i}: {:?}", results[i]);
        assert!(
            after[i] > before[i],
            "stripe {i} made no progress after the kill"
        );
    }
    // Every later operation on the dead stripe fails at once; map reports per stripe.
    let t = Instant::now();
    let e = arr.stripes()[2].read_u64s(0, 1).unwrap_err();
    assert!(matches!(e, Error::OwnerDown { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(1));
    let per_stripe = arr.map(SUM_U64, &[]);
    assert!(
        per_stripe[0].is_ok() && per_stripe[1].is_ok(),
        "{per_stripe:?}"
    );
    assert!(
        matches!(per_stripe[2], Err(Error::OwnerDown { .. })),
        "{:?}",
        per_stripe[2]
    );
    assert!(matches!(
        arr.map_reduce(SUM_U64, &[], (), |_, _| ()),
        Err(Error::OwnerDown { .. })
    ));
    let e = client.open("data#2").unwrap().write(0, b"x").unwrap_err();
    assert!(matches!(e, Error::OwnerDown { .. }), "{e:?}");
    assert!(e.to_string().contains("data#2"), "{e}");
    // The survivors see it down too.
    eprintln!(
        "killed node marked down after {detected:?}; whole test {:?}",
        t0.elapsed()
    );

    drop(client);
    for mut p in procs {
        drop(p.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if p.child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = p.child.kill();
                let _ = p.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
