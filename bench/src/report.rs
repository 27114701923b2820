//! The report: a table, a JSON document (schema in `docs/bench-json.md`) and the
//! reality check against the manifesto's claim.

use serde::Serialize;

use crate::memcpy::Memcpy;
use crate::scenario::{Measurement, Test};
use crate::units::{fmt_size, gbytes, thousands};

/// The manifesto's claim, in bytes per second: "4 PB/s, faster than local RAM".
pub const CLAIM_BYTES_PER_S: f64 = 4e15;

/// Version of the JSON document. Bump on any incompatible change.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
}

impl Host {
    pub fn detect() -> Host {
        Host {
            cpus: pfs_transport::online_cpus(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        }
    }
}

/// One A/B comparison against a baseline tool, from interleaved runs.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What is compared.
    pub name: String,
    /// Our side: what was run.
    pub ours: String,
    /// The baseline command, exactly as run.
    pub baseline: String,
    /// Unit of both values.
    pub unit: String,
    /// `(ours, baseline)` per pair, in run order (A B A B …).
    pub pairs: Vec<(f64, f64)>,
    /// Median of ours/baseline.
    pub median_ratio: f64,
    pub min_ratio: f64,
    pub max_ratio: f64,
    /// "higher" when a larger value is better (bandwidth), "lower" for latency.
    pub better: &'static str,
    /// The ratio the project targets, if any.
    pub target_ratio: Option<f64>,
    /// Whether the median ratio meets the target.
    pub meets_target: Option<bool>,
}

impl Comparison {
    pub fn new(
        name: &str,
        ours: &str,
        baseline: &str,
        unit: &str,
        pairs: Vec<(f64, f64)>,
        better: &'static str,
        target_ratio: Option<f64>,
    ) -> Comparison {
        let mut ratios: Vec<f64> = pairs.iter().map(|(a, b)| a / b).collect();
        ratios.sort_by(|a, b| a.total_cmp(b));
        let median = if ratios.is_empty() {
            f64::NAN
        } else if ratios.len() % 2 == 1 {
            ratios[ratios.len() / 2]
        } else {
            (ratios[ratios.len() / 2 - 1] + ratios[ratios.len() / 2]) / 2.0
        };
        let meets = target_ratio.map(|t| {
            if better == "higher" {
                median >= t
            } else {
                median <= t
            }
        });
        Comparison {
            name: name.into(),
            ours: ours.into(),
            baseline: baseline.into(),
            unit: unit.into(),
            median_ratio: median,
            min_ratio: ratios.first().copied().unwrap_or(f64::NAN),
            max_ratio: ratios.last().copied().unwrap_or(f64::NAN),
            pairs,
            better,
            target_ratio,
            meets_target: meets,
        }
    }
}

/// The reality check.
#[derive(Debug, Clone, Serialize)]
pub struct Reality {
    pub claim_bytes_per_s: f64,
    pub best: Option<Best>,
    pub memcpy_bytes_per_s: Option<f64>,
    /// best / claim.
    pub best_over_claim: Option<f64>,
    /// memcpy / claim.
    pub memcpy_over_claim: Option<f64>,
    /// best / memcpy.
    pub best_over_memcpy: Option<f64>,
    pub verdict: String,
    /// The claim, the physical ceilings and the measurements, fastest first, each with
    /// the best PacketFS transfer as a fraction of it.
    pub ladder: Vec<Rung>,
}

/// One step of the reality ladder.
#[derive(Debug, Clone, Serialize)]
pub struct Rung {
    pub name: String,
    pub bytes_per_s: f64,
    /// `measured` here, `reference` (a published ceiling), or `claim`.
    pub kind: &'static str,
    /// Where the figure comes from.
    pub source: String,
    /// best PacketFS transfer / this rung.
    pub best_over: Option<f64>,
}

/// Reference ceilings (one direction, decimal units).
const REFERENCES: &[(&str, f64, &str)] = &[
    (
        "12-channel DDR5-4800 memory",
        460.8e9,
        "12 channels x 4800 MT/s x 8 bytes",
    ),
    (
        "PCIe 5.0 x16, one direction",
        63.0e9,
        "32 GT/s x 16 lanes, 128b/130b",
    ),
    ("a 400 Gb/s network link", 50.0e9, "400 Gbit/s / 8"),
];

/// A rate measured by another tool in the same run, drawn as a reference line.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    pub name: String,
    pub bytes_per_s: f64,
    /// The command, exactly as run (ports shown as `P`).
    pub command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Best {
    pub backend: String,
    pub test: Test,
    pub size: u64,
    pub bytes_per_s: f64,
    pub path: String,
}

/// The whole document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub tool: &'static str,
    pub version: &'static str,
    pub command: String,
    pub host: Host,
    pub results: Vec<Measurement>,
    pub memcpy: Option<Memcpy>,
    pub comparisons: Vec<Comparison>,
    pub reality: Option<Reality>,
    /// Reference rates measured in the same run for plots (e.g. one iperf3 stream).
    pub references: Vec<Reference>,
    pub peak_rss_bytes: Option<u64>,
    pub elapsed_s: f64,
}

impl Report {
    pub fn new() -> Report {
        Report {
            schema: SCHEMA,
            tool: "pfs-bench",
            version: env!("CARGO_PKG_VERSION"),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            host: Host::detect(),
            results: Vec::new(),
            memcpy: None,
            comparisons: Vec::new(),
            reality: None,
            references: Vec::new(),
            peak_rss_bytes: None,
            elapsed_s: 0.0,
        }
    }

    /// Compute the reality check from the results and memcpy; `nic` is the link the run
    /// crossed, with its line rate in bytes/s when the driver reports one.
    pub fn reality_check_with_nic(&mut self, path: &str, nic: Option<(String, Option<f64>)>) {
        self.reality_check(path);
        let Some(r) = self.reality.as_mut() else {
            return;
        };
        let best = r.best.as_ref().map(|b| b.bytes_per_s);
        let over = |x: f64| best.map(|b| b / x);
        let mut ladder = vec![Rung {
            name: "manifesto claim (\"4 PB/s\")".into(),
            bytes_per_s: r.claim_bytes_per_s,
            kind: "claim",
            source: "the PacketFS manifesto".into(),
            best_over: over(r.claim_bytes_per_s),
        }];
        for (name, v, how) in REFERENCES {
            ladder.push(Rung {
                name: (*name).into(),
                bytes_per_s: *v,
                kind: "reference",
                source: (*how).into(),
                best_over: over(*v),
            });
        }
        if let Some(m) = r.memcpy_bytes_per_s {
            ladder.push(Rung {
                name: "local memcpy, 1 thread".into(),
                bytes_per_s: m,
                kind: "measured",
                source: "this run".into(),
                best_over: over(m),
            });
        }
        if let Some((dev, Some(rate))) = &nic {
            ladder.push(Rung {
                name: format!("line rate of {dev}, as its driver reports it"),
                bytes_per_s: *rate,
                kind: "measured",
                source: format!("ethtool {dev} (what the driver reports)"),
                best_over: over(*rate),
            });
        }
        if let Some(b) = &r.best {
            ladder.push(Rung {
                name: format!(
                    "best PacketFS ({} {} {})",
                    b.backend,
                    b.test.name(),
                    fmt_size(b.size)
                ),
                bytes_per_s: b.bytes_per_s,
                kind: "measured",
                source: "this run".into(),
                best_over: Some(1.0),
            });
        }
        ladder.sort_by(|a, b| b.bytes_per_s.total_cmp(&a.bytes_per_s));
        r.ladder = ladder;
        if let Some((dev, None)) = nic {
            r.verdict
                .push_str(&format!(" ({dev} reports no line rate)"));
        }
    }

    /// Compute the reality check from the results and memcpy.
    pub fn reality_check(&mut self, path: &str) {
        let best = self
            .results
            .iter()
            .filter(|m| m.latency.is_none() && m.test != Test::Atomic)
            .max_by(|a, b| a.gbytes_per_s.total_cmp(&b.gbytes_per_s))
            .map(|m| Best {
                backend: m.backend.clone(),
                test: m.test,
                size: m.size,
                bytes_per_s: m.gbytes_per_s * 1e9,
                path: path.to_string(),
            });
        let mem = self.memcpy.as_ref().map(|m| m.gbytes_per_s * 1e9);
        let c = CLAIM_BYTES_PER_S;
        let verdict = match (&best, mem) {
            (Some(b), Some(m)) => {
                let r = b.bytes_per_s / m;
                if r >= 1.0 {
                    format!(
                        "remote memory over PacketFS moved data {r:.2}x as fast as a local \
                         memcpy here: on this run, \"faster than local RAM\" held ({path})"
                    )
                } else {
                    format!(
                        "\"faster than local RAM\": false on this machine. The best transfer \
                         ({}, {}) reached {:.2} of local memcpy, and {:.1e} of the claimed 4 PB/s",
                        b.backend,
                        fmt_size(b.size),
                        r,
                        b.bytes_per_s / c
                    )
                }
            }
            _ => "not enough measurements for a verdict".to_string(),
        };
        self.reality = Some(Reality {
            claim_bytes_per_s: c,
            best_over_claim: best.as_ref().map(|b| b.bytes_per_s / c),
            memcpy_over_claim: mem.map(|m| m / c),
            best_over_memcpy: match (&best, mem) {
                (Some(b), Some(m)) => Some(b.bytes_per_s / m),
                _ => None,
            },
            best,
            memcpy_bytes_per_s: mem,
            verdict,
            ladder: Vec::new(),
        });
    }

    /// For every `BACKEND+mac` row (per-datagram integrity), its cost against the plain
    /// row of the same test: bandwidth and median latency ratios.
    pub fn print_integrity_cost(&self) {
        let mut first = true;
        for m in self.results.iter().filter(|m| m.backend.ends_with("+mac")) {
            let plain = m.backend.trim_end_matches("+mac");
            let Some(p) = self.results.iter().find(|p| {
                p.backend == plain && p.test == m.test && p.size == m.size && p.depth == m.depth
            }) else {
                continue;
            };
            if first {
                println!(
                    "per-datagram integrity (keyed BLAKE3 tag on every datagram), against the same test without:"
                );
                first = false;
            }
            let what = format!("{} {} {}", plain, m.test.name(), fmt_size(m.size));
            match (&p.latency, &m.latency) {
                (Some(a), Some(b)) if a.p50_us > 0.0 => println!(
                    "  {what:<24} p50 {:.2} -> {:.2} µs ({:.2}x)",
                    a.p50_us,
                    b.p50_us,
                    b.p50_us / a.p50_us
                ),
                _ if p.gbytes_per_s > 0.0 => println!(
                    "  {what:<24} {:.3} -> {:.3} GB/s ({:.2}x), {:.3} -> {:.3} Mops/s",
                    p.gbytes_per_s,
                    m.gbytes_per_s,
                    m.gbytes_per_s / p.gbytes_per_s,
                    p.mops_per_s,
                    m.mops_per_s
                ),
                _ => {}
            }
        }
    }

    pub fn print_results(&self) {
        if self.results.is_empty() {
            return;
        }
        println!(
            "{:<8} {:<13} {:>8} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "backend",
            "test",
            "size",
            "depth",
            "GB/s",
            "Gbit/s",
            "Mops/s",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "copies/B"
        );
        for m in &self.results {
            let (p50, p99, p999) = match &m.latency {
                Some(l) => (
                    format!("{:.2}", l.p50_us),
                    format!("{:.2}", l.p99_us),
                    format!("{:.2}", l.p999_us),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            println!(
                "{:<8} {:<13} {:>8} {:>5} {:>10.3} {:>9.2} {:>9.3} {:>9} {:>9} {:>9} {:>8}",
                m.backend,
                m.test.name(),
                fmt_size(m.size),
                m.depth,
                m.gbytes_per_s,
                m.gbit_per_s,
                m.mops_per_s,
                p50,
                p99,
                p999,
                m.copies_per_byte
                    .map_or("-".to_string(), |c| format!("{c:.3}")),
            );
        }
        if let Some(l) = self.results.iter().find_map(|m| m.latency.as_ref()) {
            println!(
                "latency: {}; percentiles from an HDR histogram of {} samples after warm-up",
                l.quantity,
                thousands(l.samples as f64)
            );
        }
        if let Some(m) = self.results.first() {
            println!("mode: {}", m.mode);
        }
        for m in self.results.iter().filter(|m| m.zero_copy_sends > 0) {
            println!(
                "zero-copy sends ({} {}): {}, of which the kernel reported {} copied",
                m.test.name(),
                fmt_size(m.size),
                thousands(m.zero_copy_sends as f64),
                thousands(m.zero_copy_sends_copied as f64)
            );
        }
        for m in &self.results {
            let t = &m.transport;
            if t.retransmissions + t.drops + t.protocol_errors > 0 {
                println!(
                    "transport ({} {} {}, client side): {} datagrams sent, {} received, {} retransmitted, {} dropped, {} protocol errors",
                    m.backend,
                    m.test.name(),
                    fmt_size(m.size),
                    thousands(t.datagrams_sent as f64),
                    thousands(t.datagrams_received as f64),
                    thousands(t.retransmissions as f64),
                    thousands(t.drops as f64),
                    thousands(t.protocol_errors as f64),
                );
            }
        }
    }

    pub fn print_comparisons(&self) {
        if self.comparisons.is_empty() {
            return;
        }
        println!();
        println!("Side by side (interleaved A B A B …; median ratio, min–max):");
        for c in &self.comparisons {
            let pairs: Vec<String> = c
                .pairs
                .iter()
                .map(|(a, b)| format!("{a:.2}/{b:.2}"))
                .collect();
            let target = match (c.target_ratio, c.meets_target) {
                (Some(t), Some(ok)) => format!(
                    "  target {} {t}: {}",
                    if c.better == "higher" { "≥" } else { "≤" },
                    if ok { "met" } else { "NOT met" }
                ),
                _ => String::new(),
            };
            println!("  {}", c.name);
            println!("    ours:     {}", c.ours);
            println!("    baseline: {}", c.baseline);
            println!(
                "    ratio ours/baseline {:.2} ({:.2}–{:.2}), {} is better; pairs ({}) {}{}",
                c.median_ratio,
                c.min_ratio,
                c.max_ratio,
                c.better,
                c.unit,
                pairs.join(" "),
                target
            );
        }
    }

    pub fn print_reality(&self) {
        let Some(r) = &self.reality else {
            return;
        };
        println!();
        println!("Reality check");
        println!(
            "  {:<34} {:>18}",
            "manifesto claim (\"4 PB/s\")",
            gbytes(r.claim_bytes_per_s)
        );
        if let Some(m) = r.memcpy_bytes_per_s {
            println!(
                "  {:<34} {:>18}   {:.1e} of the claim",
                "local memcpy, 1 thread",
                gbytes(m),
                m / r.claim_bytes_per_s
            );
        }
        if let Some(b) = &r.best {
            println!(
                "  {:<34} {:>18}   {:.1e} of the claim",
                format!(
                    "best PacketFS ({} {} {})",
                    b.backend,
                    b.test.name(),
                    fmt_size(b.size)
                ),
                gbytes(b.bytes_per_s),
                b.bytes_per_s / r.claim_bytes_per_s
            );
            println!("  {:<34} {}", "path", b.path);
        }
        if let Some(x) = r.best_over_memcpy {
            println!("  {:<34} {:>18.3}", "best PacketFS / local memcpy", x);
        }
        if !r.ladder.is_empty() {
            println!("  the ladder (fastest first; best PacketFS as a fraction of each):");
            for g in &r.ladder {
                println!(
                    "    {:<40} {:>18}  {:<9} {}",
                    g.name,
                    gbytes(g.bytes_per_s),
                    g.kind,
                    g.best_over.map_or("-".to_string(), |x| if x >= 1e-3 {
                        format!("{x:.3}")
                    } else {
                        format!("{x:.1e}")
                    })
                );
            }
        }
        println!("  verdict: {}", r.verdict);
        if let Some(p) = self.peak_rss_bytes {
            println!(
                "  peak memory (VmHWM): {:.1} MiB",
                p as f64 / (1 << 20) as f64
            );
        }
    }

    /// The results as CSV: one row per measurement, the columns of
    /// `docs/bench-json.md`'s Measurement (latency columns empty for bandwidth runs).
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "backend,test,size,depth,seconds,ops,bytes,gbytes_per_s,gbit_per_s,mops_per_s,\
             samples,p50_us,p90_us,p99_us,p999_us,max_us,copies_per_byte,mode,connections,sweep\n",
        );
        let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
        for m in &self.results {
            let l = m.latency.as_ref();
            let mode = m.mode.replace('"', "\"\"");
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\",{},{}\n",
                m.backend,
                m.test.name(),
                m.size,
                m.depth,
                m.seconds,
                m.ops,
                m.bytes,
                m.gbytes_per_s,
                m.gbit_per_s,
                m.mops_per_s,
                l.map_or(String::new(), |l| l.samples.to_string()),
                opt(l.map(|l| l.p50_us)),
                opt(l.map(|l| l.p90_us)),
                opt(l.map(|l| l.p99_us)),
                opt(l.map(|l| l.p999_us)),
                opt(l.map(|l| l.max_us)),
                opt(m.copies_per_byte),
                mode,
                m.connections,
                m.sweep.unwrap_or("")
            ));
        }
        out
    }

    /// Write the JSON and CSV forms where asked (`-` for stdout).
    pub fn write_outputs(&self, json: Option<&str>, csv: Option<&str>) -> std::io::Result<()> {
        if let Some(j) = json {
            self.write_json(j)?;
        }
        if let Some(c) = csv {
            self.write_csv(c)?;
        }
        Ok(())
    }

    pub fn write_csv(&self, path: &str) -> std::io::Result<()> {
        if path == "-" {
            print!("{}", self.to_csv());
            Ok(())
        } else {
            std::fs::write(path, self.to_csv())
        }
    }

    pub fn write_json(&self, path: &str) -> std::io::Result<()> {
        let s = serde_json::to_string_pretty(self).expect("report serialises");
        if path == "-" {
            println!("{s}");
            Ok(())
        } else {
            std::fs::write(path, s + "\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let c = Comparison::new(
            "x",
            "a",
            "b",
            "u",
            vec![(1.0, 2.0), (3.0, 2.0), (2.0, 2.0)],
            "higher",
            Some(0.9),
        );
        assert_eq!(c.median_ratio, 1.0);
        assert_eq!(c.min_ratio, 0.5);
        assert_eq!(c.max_ratio, 1.5);
        assert_eq!(c.meets_target, Some(true));
        let c = Comparison::new(
            "x",
            "a",
            "b",
            "u",
            vec![(4.0, 2.0), (2.0, 2.0)],
            "lower",
            Some(1.0),
        );
        assert_eq!(c.median_ratio, 1.5);
        assert_eq!(c.meets_target, Some(false));
    }

    #[test]
    fn the_ladder_is_sorted_and_each_rung_has_its_ratio() {
        let mut r = Report::new();
        r.memcpy = Some(crate::memcpy::Memcpy {
            buffer: 1,
            copies: 1,
            gbytes_per_s: 10.0,
            threads: 1,
        });
        r.results.push(crate::scenario::Measurement {
            backend: "xdp".into(),
            test: Test::Write,
            size: 1 << 20,
            depth: 8,
            refill: 1,
            seconds: 1.0,
            ops: 1,
            bytes: 1,
            gbytes_per_s: 1.0,
            gbit_per_s: 8.0,
            mops_per_s: 0.0,
            latency: None,
            copies_per_byte: None,
            mode: String::new(),
            connections: 1,
            sweep: None,
            zero_copy_sends: 0,
            zero_copy_sends_copied: 0,
            transport: Default::default(),
            first_op_seconds: 0.0,
        });
        r.reality_check_with_nic("veth", Some(("pfs-b0".into(), Some(1.25e9))));
        let ladder = &r.reality.as_ref().unwrap().ladder;
        let names: Vec<&str> = ladder.iter().map(|g| g.name.as_str()).collect();
        assert!(names[0].contains("4 PB/s"), "{names:?}");
        assert!(
            names.last().unwrap().starts_with("best PacketFS"),
            "{names:?}"
        );
        assert!(
            ladder
                .windows(2)
                .all(|w| w[0].bytes_per_s >= w[1].bytes_per_s)
        );
        let rate = ladder.iter().find(|g| g.name.contains("pfs-b0")).unwrap();
        assert_eq!(rate.best_over, Some(0.8));
        let mem = ladder.iter().find(|g| g.name.contains("memcpy")).unwrap();
        assert_eq!(mem.best_over, Some(0.1));
        // A NIC without a line rate is said to have none.
        r.reality_check_with_nic("veth", Some(("pfs-b0".into(), None)));
        assert!(
            r.reality
                .as_ref()
                .unwrap()
                .verdict
                .contains("reports no line rate")
        );
    }
}
