//! `pfs-bench info`: what this machine offers PacketFS — CPUs and NUMA, memory and huge
//! pages, io_uring, each NIC (driver, line rate, MTU, queues, XDP, AF_XDP zero-copy,
//! NUMA node), RDMA devices — and, for every backend, whether it can run here and, if
//! not, why and what to do.

use std::collections::BTreeMap;
use std::process::Command;

use pfs_transport::BackendKind;
use serde::Serialize;

use crate::AnyResult;

#[derive(Debug, Serialize)]
struct Info {
    kernel: String,
    cpus: usize,
    numa_nodes: Option<usize>,
    memory_total_kib: Option<u64>,
    huge_pages: HugePages,
    locked_memory_limit: String,
    io_uring: Result<Vec<&'static str>, String>,
    nics: Vec<Nic>,
    rdma: Vec<RdmaDevice>,
    backends: BTreeMap<String, Result<String, String>>,
}

#[derive(Debug, Serialize, Default)]
struct HugePages {
    total: u64,
    free: u64,
    size_kib: u64,
    transparent: String,
}

#[derive(Debug, Serialize, Default)]
struct Nic {
    name: String,
    driver: String,
    bus: String,
    line_rate_gbit: Option<f64>,
    mtu: Option<u32>,
    rx_queues: Option<u32>,
    xdp_attached: Option<String>,
    native_xdp: String,
    af_xdp_zero_copy: String,
    numa_node: String,
}

#[derive(Debug, Serialize)]
struct RdmaDevice {
    name: String,
    ports: Vec<String>,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn cmd(prog: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(prog).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value after `key:` on the first line that has it.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.trim_start_matches(':').trim())
}

fn meminfo(key: &str) -> Option<u64> {
    let m = read("/proc/meminfo")?;
    field(&m, key)?.split_whitespace().next()?.parse().ok()
}

/// Drivers with native XDP and with AF_XDP zero-copy in mainline Linux (as of 6.x).
const NATIVE_XDP: &[&str] = &[
    "veth",
    "virtio_net",
    "tun",
    "mlx4_en",
    "mlx5_core",
    "i40e",
    "ice",
    "ixgbe",
    "ixgbevf",
    "igb",
    "igc",
    "bnxt_en",
    "ena",
    "nfp",
    "qede",
    "sfc",
    "stmmac",
    "mvneta",
    "mvpp2",
    "netsec",
    "xsk",
    "gve",
    "idpf",
    "octeontx2",
    "hv_netvsc",
    "tsnep",
    "fec",
];
const ZERO_COPY: &[&str] = &[
    "mlx5_core",
    "i40e",
    "ice",
    "ixgbe",
    "igc",
    "stmmac",
    "gve",
    "idpf",
    "octeontx2",
    "tsnep",
    "fec",
    "virtio_net",
];

fn numa_of(topo: Option<&hwlocality::Topology>, name: &str) -> String {
    use hwlocality::object::types::ObjectType;
    let Some(t) = topo else {
        return "unknown (hwloc topology unavailable)".into();
    };
    let dev = t
        .objects_with_type(ObjectType::OSDevice)
        .find(|o| o.name().is_some_and(|n| n.to_bytes() == name.as_bytes()));
    let Some(dev) = dev else {
        return "none (virtual device, no PCI parent)".into();
    };
    for a in dev.ancestors() {
        if let Some(ns) = a.nodeset()
            && ns.weight().is_some_and(|w| w > 0)
        {
            let ids: Vec<String> = ns.iter_set().map(|i| i.to_string()).collect();
            return format!("node {}", ids.join(","));
        }
    }
    "unknown".into()
}

fn nics(topo: Option<&hwlocality::Topology>) -> Vec<Nic> {
    let Some(dev) = read("/proc/thread-self/net/dev") else {
        return Vec::new();
    };
    let links = cmd("ip", &["-o", "-d", "link", "show"]).unwrap_or_default();
    let mut out = Vec::new();
    for line in dev.lines().skip(2) {
        let Some((name, _)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_string();
        if name == "lo" {
            continue;
        }
        let mut n = Nic {
            name: name.clone(),
            ..Default::default()
        };
        let drv = cmd("ethtool", &["-i", &name]).unwrap_or_default();
        n.driver = field(&drv, "driver").unwrap_or("unknown").to_string();
        n.bus = field(&drv, "bus-info")
            .filter(|b| !b.is_empty())
            .unwrap_or("none")
            .to_string();
        n.line_rate_gbit = crate::baseline::line_rate(&name).map(|b| b * 8.0 / 1e9);
        let link = links
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|x| x.trim().split('@').next() == Some(name.as_str()))
            })
            .unwrap_or("");
        let mut words = link.split_whitespace();
        while let Some(w) = words.next() {
            if w == "mtu" {
                n.mtu = words.next().and_then(|v| v.parse().ok());
            }
            if w.starts_with("prog/xdp") {
                n.xdp_attached = Some(format!("{w} {}", words.next().unwrap_or("")));
            }
        }
        let ch = cmd("ethtool", &["-l", &name]).unwrap_or_default();
        // The second block is "Current hardware settings".
        if let Some(cur) = ch.split("Current hardware settings").nth(1) {
            let get = |k: &str| {
                field(cur, k)
                    .and_then(|v| v.parse::<u32>().ok())
                    .filter(|v| *v > 0)
            };
            n.rx_queues = get("Combined").or_else(|| get("RX"));
        }
        let d = n.driver.as_str();
        n.native_xdp = if NATIVE_XDP.contains(&d) {
            format!("yes ({d})")
        } else {
            format!("unknown for {d}: generic (skb) XDP works on any interface, slower")
        };
        n.af_xdp_zero_copy = if d == "veth" {
            "no (veth: copy mode only, EOPNOTSUPP)".into()
        } else if ZERO_COPY.contains(&d) {
            format!("yes in mainline {d}")
        } else {
            format!(
                "not known for {d}; `pfs-bench info --probe {name}` (root) binds one and reports"
            )
        };
        n.numa_node = numa_of(topo, &name);
        out.push(n);
    }
    out
}

fn rdma() -> Vec<RdmaDevice> {
    let Ok(dir) = std::fs::read_dir("/sys/class/infiniband") else {
        return Vec::new();
    };
    let mut v = Vec::new();
    for d in dir.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let mut ports = Vec::new();
        if let Ok(ps) = std::fs::read_dir(d.path().join("ports")) {
            for p in ps.flatten() {
                let pp = p.path();
                let state = read(&pp.join("state").to_string_lossy()).unwrap_or_default();
                let layer = read(&pp.join("link_layer").to_string_lossy()).unwrap_or_default();
                let gid = read(&pp.join("gids/0").to_string_lossy()).unwrap_or_default();
                ports.push(format!(
                    "port {}: {}, {}, GID[0] {}",
                    p.file_name().to_string_lossy(),
                    state.trim(),
                    layer.trim(),
                    gid.trim()
                ));
            }
        }
        v.push(RdmaDevice { name, ports });
    }
    v
}

fn backends(
    io: &Result<Vec<&'static str>, String>,
    nics: &[Nic],
) -> BTreeMap<String, Result<String, String>> {
    let mut m = BTreeMap::new();
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let root = unsafe { libc::geteuid() } == 0;
    for k in BackendKind::ALL {
        let r = if let Some(why) = k.unavailable_reason() {
            Err(why)
        } else {
            match k {
                BackendKind::Tcp | BackendKind::Udp => match io {
                    Ok(_) => Ok("usable: io_uring works here".to_string()),
                    Err(e) => Err(e.clone()),
                },
                BackendKind::Xdp if !root => Err(
                    "needs CAP_NET_ADMIN, CAP_BPF and CAP_NET_RAW: run as root, or use udp://"
                        .to_string(),
                ),
                BackendKind::Xdp if nics.is_empty() => Err(
                    "no network interface in this namespace besides lo: create one \
                     (tools/topology.sh up makes two hosts on a veth pair)"
                        .to_string(),
                ),
                BackendKind::Xdp => Ok(format!(
                    "usable on {} (name the interface: xdp://IFACE/HOST:PORT)",
                    nics.iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                _ => Ok("usable".to_string()),
            }
        };
        m.insert(k.to_string(), r);
    }
    m
}

/// Attach the XDP program to `iface` and bind AF_XDP sockets (zero-copy first), then
/// undo it all; returns how the sockets were bound.
#[cfg(feature = "xdp")]
fn probe(iface: &str) -> AnyResult<String> {
    Ok(pfs_transport::rawxdp::probe(iface)?)
}

#[cfg(not(feature = "xdp"))]
fn probe(_: &str) -> AnyResult<String> {
    Err("this pfs-bench was built without --features xdp: it cannot probe AF_XDP".into())
}

pub fn info(probe_iface: Option<&str>, json: Option<&str>) -> AnyResult {
    let topo = hwlocality::Topology::builder()
        .with_io_type_filter(hwlocality::topology::builder::TypeFilter::KeepAll)
        .ok()
        .and_then(|b| b.build().ok());
    let io = pfs_transport::io_uring_support();
    let nics = nics(topo.as_ref());
    let limits = read("/proc/self/limits").unwrap_or_default();
    let memlock = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            format!(
                "{} (soft) / {} (hard) {}",
                v[3],
                v[4],
                v.get(5).unwrap_or(&"")
            )
        })
        .unwrap_or_else(|| "unknown".into());
    let i = Info {
        kernel: read("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus: pfs_transport::online_cpus(),
        numa_nodes: topo.as_ref().and_then(|t| t.nodeset().weight()),
        memory_total_kib: meminfo("MemTotal"),
        huge_pages: HugePages {
            total: meminfo("HugePages_Total").unwrap_or(0),
            free: meminfo("HugePages_Free").unwrap_or(0),
            size_kib: meminfo("Hugepagesize").unwrap_or(0),
            transparent: read("/sys/kernel/mm/transparent_hugepage/enabled")
                .and_then(|s| {
                    s.split_whitespace()
                        .find(|w| w.starts_with('['))
                        .map(|w| w.trim_matches(['[', ']']).to_string())
                })
                .unwrap_or_else(|| "unknown".into()),
        },
        locked_memory_limit: memlock,
        backends: backends(&io, &nics),
        io_uring: io,
        rdma: rdma(),
        nics,
    };
    println!("pfs-bench info {}", env!("CARGO_PKG_VERSION"));
    println!("machine");
    println!(
        "  kernel {}, {} CPUs online, {} NUMA node(s)",
        i.kernel,
        i.cpus,
        i.numa_nodes.map_or("?".into(), |n| n.to_string())
    );
    println!(
        "  memory {} MiB; huge pages: {} free of {} ({} KiB each); transparent huge pages: {}",
        i.memory_total_kib.unwrap_or(0) / 1024,
        i.huge_pages.free,
        i.huge_pages.total,
        i.huge_pages.size_kib,
        i.huge_pages.transparent
    );
    println!(
        "  locked-memory limit (AF_XDP UMEM, RDMA registrations): {}",
        i.locked_memory_limit
    );
    match &i.io_uring {
        Ok(f) => println!("  io_uring: usable; features {}", f.join(" ")),
        Err(e) => println!("  io_uring: NOT usable: {e}"),
    }
    println!("network interfaces (this network namespace)");
    if i.nics.is_empty() {
        println!("  none besides lo");
    }
    for n in &i.nics {
        println!(
            "  {}: driver {}, bus {}, line rate {}, MTU {}, rx queues {}",
            n.name,
            n.driver,
            n.bus,
            n.line_rate_gbit
                .map_or("not reported".to_string(), |g| format!("{g} Gbit/s")),
            n.mtu.map_or("?".into(), |m| m.to_string()),
            n.rx_queues.map_or("?".into(), |q| q.to_string())
        );
        println!(
            "    XDP attached: {}",
            n.xdp_attached.as_deref().unwrap_or("none")
        );
        println!("    native XDP: {}", n.native_xdp);
        println!("    AF_XDP zero-copy: {}", n.af_xdp_zero_copy);
        println!("    NUMA node: {}", n.numa_node);
    }
    println!("RDMA devices");
    if i.rdma.is_empty() {
        println!(
            "  none (/sys/class/infiniband is empty): soft-RoCE needs the rdma_rxe module \
             (modprobe rdma_rxe; rdma link add rxe0 type rxe netdev IFACE)"
        );
    }
    for d in &i.rdma {
        println!("  {}", d.name);
        for p in &d.ports {
            println!("    {p}");
        }
    }
    println!("backends");
    for (k, r) in &i.backends {
        match r {
            Ok(s) => println!("  {k:<5} {s}"),
            Err(e) => println!("  {k:<5} not usable: {e}"),
        }
    }
    if let Some(iface) = probe_iface {
        match probe(iface) {
            Ok(mode) => println!(
                "probe of {iface}: XDP attached and detached; AF_XDP sockets bound in {mode}"
            ),
            Err(e) => println!("probe of {iface}: {e}"),
        }
    }
    if let Some(j) = json {
        let text = serde_json::to_string_pretty(&i)?;
        if j == "-" {
            println!("{text}");
        } else {
            std::fs::write(j, text)?;
        }
    }
    Ok(())
}
