//! What the kernel did during a sample: the soft-RoCE devices' counters (packets,
//! retransmissions, deferred completer runs), the network stack's per-CPU drops and
//! squeezes, and how each CPU's time was spent. `pfs-bench rdma` prints it after each
//! write sample of either tool, so that a slow sample shows whether the link lost
//! packets (and the requester waited out a retransmission timer) or the CPUs were busy
//! elsewhere.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One reading of the counters. Whatever cannot be read (no such file, a kernel
/// without rxe's counters) is simply absent.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// `device/counter` → value, from `/sys/class/infiniband/*/ports/*/hw_counters`.
    rdma: BTreeMap<String, u64>,
    /// Per CPU: user, system, softirq, idle (jiffies, from `/proc/stat`).
    cpus: Vec<[u64; 4]>,
    /// Summed over CPUs: packets dropped, and times the budget ran out, from
    /// `/proc/net/softnet_stat`.
    softnet: [u64; 2],
}

impl Snapshot {
    pub fn take() -> Snapshot {
        Snapshot {
            rdma: rdma_counters(),
            cpus: std::fs::read_to_string("/proc/stat")
                .map(|s| cpu_times(&s))
                .unwrap_or_default(),
            softnet: std::fs::read_to_string("/proc/net/softnet_stat")
                .map(|s| softnet(&s))
                .unwrap_or_default(),
        }
    }

    /// What changed since `before`, on one line: the counters that moved, then each
    /// CPU's share of user, system, softirq and idle time.
    pub fn since(&self, before: &Snapshot) -> String {
        let mut out = String::new();
        for (k, v) in &self.rdma {
            let d = v.saturating_sub(before.rdma.get(k).copied().unwrap_or(0));
            if d > 0 {
                let _ = write!(out, "{k} {d}, ");
            }
        }
        let [drops, squeezed] = [0, 1].map(|i| self.softnet[i].saturating_sub(before.softnet[i]));
        let _ = write!(out, "softnet drops {drops}, squeezed {squeezed}");
        for (i, (a, b)) in before.cpus.iter().zip(&self.cpus).enumerate() {
            let d: Vec<u64> = (0..4).map(|j| b[j].saturating_sub(a[j])).collect();
            let total = d.iter().sum::<u64>().max(1) as f64;
            let pct = |j: usize| d[j] as f64 * 100.0 / total;
            let _ = write!(
                out,
                "; cpu{i} usr {:.0}% sys {:.0}% softirq {:.0}% idle {:.0}%",
                pct(0),
                pct(1),
                pct(2),
                pct(3)
            );
        }
        out
    }
}

fn rdma_counters() -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    let Ok(devs) = std::fs::read_dir("/sys/class/infiniband") else {
        return m;
    };
    for dev in devs.flatten() {
        let name = dev.file_name().to_string_lossy().into_owned();
        let Ok(ports) = std::fs::read_dir(dev.path().join("ports")) else {
            continue;
        };
        for port in ports.flatten() {
            let Ok(files) = std::fs::read_dir(port.path().join("hw_counters")) else {
                continue;
            };
            for f in files.flatten() {
                let v = std::fs::read_to_string(f.path())
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if let Some(v) = v {
                    let counter = f.file_name().to_string_lossy().into_owned();
                    *m.entry(format!("{name}/{counter}")).or_insert(0) += v;
                }
            }
        }
    }
    m
}

/// Per-CPU user (with nice), system, softirq and idle (with iowait) jiffies from the
/// text of `/proc/stat` (the `cpuN` lines; the `cpu` total is skipped).
fn cpu_times(stat: &str) -> Vec<[u64; 4]> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let at = |i: usize| f.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq ...
            [at(0) + at(1), at(2) + at(5), at(6), at(3) + at(4)]
        })
        .collect()
}

/// Dropped packets and squeezed budgets summed over CPUs, from the text of
/// `/proc/net/softnet_stat` (hexadecimal columns: processed, dropped, time_squeeze, …).
fn softnet(text: &str) -> [u64; 2] {
    let mut s = [0u64; 2];
    for l in text.lines() {
        let f: Vec<u64> = l
            .split_whitespace()
            .map(|x| u64::from_str_radix(x, 16).unwrap_or(0))
            .collect();
        s[0] += f.get(1).copied().unwrap_or(0);
        s[1] += f.get(2).copied().unwrap_or(0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_are_split_into_user_system_softirq_idle() {
        let stat = "cpu  10 0 10 10 0 0 0 0 0 0\n\
                    cpu0 1 2 3 4 5 6 7 8 0 0\n\
                    cpu1 10 0 20 30 0 0 40 0 0 0\nintr 5\n";
        assert_eq!(cpu_times(stat), vec![[3, 9, 7, 9], [10, 20, 40, 30]]);
    }

    #[test]
    fn softnet_columns_are_hexadecimal_and_summed() {
        let text = "0000ff00 0000000a 00000001 0\n00000001 00000010 00000002 0\n";
        assert_eq!(softnet(text), [0x1a, 3]);
    }

    #[test]
    fn since_reports_what_moved_and_cpu_shares() {
        let mut a = Snapshot::default();
        a.rdma.insert("rxe0/sent_pkts".into(), 5);
        a.rdma.insert("rxe0/duplicate_request".into(), 2);
        a.cpus = vec![[0, 0, 0, 0]];
        let mut b = a.clone();
        b.rdma.insert("rxe0/sent_pkts".into(), 105);
        b.softnet = [4, 0];
        b.cpus = vec![[50, 25, 25, 0]];
        assert_eq!(
            b.since(&a),
            "rxe0/sent_pkts 100, softnet drops 4, squeezed 0; cpu0 usr 50% sys 25% \
             softirq 25% idle 0%"
        );
    }
}
