//! The XDP steering program (`ebpf/pfs_xdp.bpf.c`): loading, attaching through a BPF
//! link, and its maps.
//!
//! The program is attached with a BPF link owned by this process, so it is detached when
//! the last reference goes — on drop, on exit, and when the process is killed (the
//! kernel drops the link with the file descriptor). Nothing is pinned in bpffs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, Object, ObjectBuilder};

/// The compiled program (built by `build.rs` with clang through libbpf-cargo).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pfs_xdp.bpf.o"));

/// Counter slots of the `stats` map (`enum pfs_stat` in the C source).
#[allow(dead_code)] // `Steered` is only read by tools such as bpftool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stat {
    Steered = 0,
    Passed = 1,
    Injected = 2,
    NoSocket = 3,
}

/// The loaded object and its maps.
pub(crate) struct Loaded {
    obj: Object,
    xsks: MapHandle,
    ports: MapHandle,
    fault: MapHandle,
    #[cfg_attr(not(test), allow(dead_code))]
    stats: MapHandle,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").finish_non_exhaustive()
    }
}

fn hint(e: &libbpf_rs::Error) -> &'static str {
    let s = format!("{e:#}").to_ascii_lowercase();
    if matches!(e.kind(), libbpf_rs::ErrorKind::PermissionDenied)
        || s.contains("operation not permitted")
    {
        ": loading XDP programs needs CAP_BPF and CAP_NET_ADMIN: run as root or use udp://"
    } else if s.contains("busy") || s.contains("exists") {
        ": another XDP program is attached (see `ip link show`); detach it with \
         `ip link set dev IFACE xdp off` or choose another interface"
    } else if s.contains("not supported") {
        ": the interface does not support XDP"
    } else {
        ""
    }
}

fn map(obj: &Object, name: &str) -> Result<MapHandle, String> {
    let m = obj
        .maps()
        .find(|m| m.name() == name)
        .ok_or_else(|| format!("the XDP object has no map {name:?}"))?;
    MapHandle::try_from(&m).map_err(|e| format!("map {name}: {e}"))
}

impl Loaded {
    /// Load the program into the kernel (both variants; nothing attached yet).
    pub(crate) fn load() -> Result<Loaded, String> {
        // libbpf prints to stderr by default; its messages go to our log instead, and
        // failures reach the caller as errors.
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(|| {
            libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, |level, msg| {
                tracing::debug!(?level, "libbpf: {}", msg.trim_end());
            })));
        });
        let open = ObjectBuilder::default()
            .open_memory(OBJECT)
            .map_err(|e| format!("opening the XDP object: {e:#}"))?;
        let obj = open
            .load()
            .map_err(|e| format!("loading the XDP program: {e:#}{}", hint(&e)))?;
        Ok(Loaded {
            xsks: map(&obj, "xsks")?,
            ports: map(&obj, "ports")?,
            fault: map(&obj, "fault")?,
            stats: map(&obj, "stats")?,
            obj,
        })
    }

    fn program(&self, frags: bool) -> Result<libbpf_rs::ProgramMut<'_>, String> {
        let want = if frags { "pfs_xdp_frags" } else { "pfs_xdp" };
        self.obj
            .progs_mut()
            .find(|p| p.name() == want)
            .ok_or_else(|| format!("the XDP object has no program {want}"))
    }

    /// Attach to `ifindex` through a BPF link.
    pub(crate) fn attach(&self, iface: &str, ifindex: u32, frags: bool) -> Result<Link, String> {
        let p = self.program(frags)?;
        p.attach_xdp(ifindex as i32).map_err(|e| {
            format!(
                "attaching the XDP program to {iface}: {e:#}{}",
                hint(&e).replace("IFACE", iface)
            )
        })
    }

    /// Steer UDP destination port `port` to the AF_XDP sockets.
    pub(crate) fn add_port(&self, port: u16) -> Result<(), String> {
        self.ports
            .update(&port.to_ne_bytes(), &[1], MapFlags::ANY)
            .map_err(|e| format!("ports map: {e:#}"))
    }

    pub(crate) fn remove_port(&self, port: u16) {
        let _ = self.ports.delete(&port.to_ne_bytes());
    }

    /// Insert the AF_XDP socket `fd` for rx queue `queue`.
    pub(crate) fn set_socket(&self, queue: u32, fd: i32) -> Result<(), String> {
        self.xsks
            .update(&queue.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
            .map_err(|e| format!("XSKMAP entry for queue {queue}: {e:#}"))
    }

    /// Drop `n` per million of the steered packets (fault injection; 0 turns it off).
    pub(crate) fn set_drop_per_million(&self, n: u32) -> Result<(), String> {
        self.fault
            .update(
                &0u32.to_ne_bytes(),
                &n.min(1_000_000).to_ne_bytes(),
                MapFlags::ANY,
            )
            .map_err(|e| format!("fault map: {e:#}"))
    }

    /// A counter summed over CPUs.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn stat(&self, s: Stat) -> u64 {
        let Ok(Some(per_cpu)) = self
            .stats
            .lookup_percpu(&(s as u32).to_ne_bytes(), MapFlags::ANY)
        else {
            return 0;
        };
        per_cpu
            .iter()
            .filter_map(|v| v.get(..8))
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8])))
            .sum()
    }

    /// Run the program once on `frame` as if it arrived on rx queue 0
    /// (`BPF_PROG_TEST_RUN`); returns the XDP action.
    #[cfg(test)]
    pub(crate) fn test_run(&self, frame: &[u8], frags: bool) -> Result<u32, String> {
        let p = self.program(frags)?;
        let input = libbpf_rs::ProgramInput {
            data_in: Some(frame),
            ..Default::default()
        };
        let out = p.test_run(input).map_err(|e| format!("test run: {e:#}"))?;
        Ok(out.return_value)
    }
}

/// The program attached to one interface, with the maps its endpoint fills.
#[derive(Debug)]
pub(crate) struct Attachment {
    pub(crate) prog: Loaded,
    _link: Link,
    key: (u64, u32),
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // try_lock: `attach` may hold the lock while dropping the last reference to a
        // stale attachment; a leftover dead entry is harmless (its Weak is empty).
        if let Ok(mut r) = REGISTRY.try_lock()
            && let Some(m) = r.as_mut()
        {
            m.remove(&self.key);
        }
    }
}

/// Interfaces this process has attached to, by (network namespace, ifindex).
type Registry = HashMap<(u64, u32), Weak<Attachment>>;
static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// The calling thread's network namespace (its inode number).
fn netns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Load the program and attach it to `iface`. One endpoint per interface per process:
/// the AF_XDP sockets own the interface's queues.
pub(crate) fn attach(iface: &str, ifindex: u32, frags: bool) -> Result<Arc<Attachment>, String> {
    let key = (netns(), ifindex);
    let mut reg = REGISTRY
        .lock()
        .map_err(|_| "xdp registry poisoned".to_string())?;
    let reg = reg.get_or_insert_with(HashMap::new);
    if reg.get(&key).and_then(Weak::upgrade).is_some() {
        return Err(format!(
            "{iface} already carries an xdp endpoint of this process: its AF_XDP sockets \
             own the interface's queues; connect through that endpoint, or use another \
             interface"
        ));
    }
    let prog = Loaded::load()?;
    let link = prog.attach(iface, ifindex, frags)?;
    let a = Arc::new(Attachment {
        prog,
        _link: link,
        key,
    });
    reg.insert(key, Arc::downgrade(&a));
    Ok(a)
}

#[cfg(test)]
mod tests {
    //! The program's decisions on crafted packets, through `BPF_PROG_TEST_RUN`: no NIC
    //! needed, but loading a program needs root.

    use super::*;
    use crate::xdp::frame::{self, Route};

    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;

    fn loaded() -> Option<Loaded> {
        // SAFETY-free probe: geteuid has no preconditions; done through std's metadata.
        if !crate::sys::is_root() {
            eprintln!("SKIPPED: XDP program tests need root (BPF_PROG_TEST_RUN)");
            return None;
        }
        Some(Loaded::load().expect("load the XDP program"))
    }

    fn udp(dport: u16, len: usize) -> Vec<u8> {
        let r = Route {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: std::net::SocketAddrV4::new("198.18.0.2".parse().unwrap(), dport),
        };
        let mut f = vec![0u8; frame::HEADERS + len];
        frame::write_headers(&mut f, &r, len, 1);
        f
    }

    #[test]
    fn steers_only_the_transport_port() {
        let Some(p) = loaded() else { return };
        p.add_port(7000).unwrap();
        for frags in [false, true] {
            // Our port, but no socket on queue 0: dropped and counted.
            let before = p.stat(Stat::NoSocket);
            assert_eq!(p.test_run(&udp(7000, 64), frags).unwrap(), XDP_DROP);
            assert_eq!(p.stat(Stat::NoSocket), before + 1);
            // Other ports, ARP, ICMP, IPv6, runts: to the kernel.
            let passed = p.stat(Stat::Passed);
            assert_eq!(p.test_run(&udp(7001, 64), frags).unwrap(), XDP_PASS);
            let mut arp = udp(7000, 64);
            arp[12..14].copy_from_slice(&[0x08, 0x06]);
            assert_eq!(p.test_run(&arp, frags).unwrap(), XDP_PASS);
            let mut icmp = udp(7000, 64);
            icmp[23] = 1;
            assert_eq!(p.test_run(&icmp, frags).unwrap(), XDP_PASS);
            let mut v6 = udp(7000, 64);
            v6[12..14].copy_from_slice(&[0x86, 0xdd]);
            assert_eq!(p.test_run(&v6, frags).unwrap(), XDP_PASS);
            let mut frag = udp(7000, 64);
            frag[20] = 0x00;
            frag[21] = 0x10; // a later fragment: no UDP header to look at
            assert_eq!(p.test_run(&frag, frags).unwrap(), XDP_PASS);
            assert_eq!(p.test_run(&udp(7000, 64)[..40], frags).unwrap(), XDP_PASS);
            assert_eq!(p.stat(Stat::Passed), passed + 6);
        }
        p.remove_port(7000);
        assert_eq!(p.test_run(&udp(7000, 64), false).unwrap(), XDP_PASS);
    }

    #[test]
    fn the_fault_map_drops_its_share_of_steered_packets() {
        let Some(p) = loaded() else { return };
        p.add_port(7000).unwrap();
        // Everything dropped at one million per million; nothing at zero.
        p.set_drop_per_million(1_000_000).unwrap();
        for _ in 0..20 {
            assert_eq!(p.test_run(&udp(7000, 64), false).unwrap(), XDP_DROP);
        }
        assert_eq!(p.stat(Stat::Injected), 20);
        assert_eq!(p.stat(Stat::NoSocket), 0);
        // 10%: about a tenth of 4000 tries.
        p.set_drop_per_million(100_000).unwrap();
        for _ in 0..4000 {
            p.test_run(&udp(7000, 64), false).unwrap();
        }
        let injected = p.stat(Stat::Injected) - 20;
        assert!(
            (250..=550).contains(&injected),
            "{injected} of 4000 dropped"
        );
        // Other ports are never dropped by the fault map.
        for _ in 0..100 {
            assert_eq!(p.test_run(&udp(7001, 64), false).unwrap(), XDP_PASS);
        }
        p.set_drop_per_million(0).unwrap();
        let before = p.stat(Stat::Injected);
        for _ in 0..100 {
            p.test_run(&udp(7000, 64), false).unwrap();
        }
        assert_eq!(p.stat(Stat::Injected), before);
    }
}
