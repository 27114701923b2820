//! Node configuration: in code ([`NodeConfig`]'s builder) or from a TOML file.

use std::path::Path;
use std::time::Duration;

use pfs_transport::Secret;
use serde::Deserialize;

use crate::error::{Error, Result};

/// SWIM failure-detection timing (see `docs/memshare.md` for the detection bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureDetection {
    /// How often each node probes one random member.
    pub probe_period: Duration,
    /// How long a direct probe waits for its answer before indirect probes start
    /// (must be below `probe_period`).
    pub probe_rtt: Duration,
    /// How long a suspected member has to refute the suspicion before it is declared
    /// down.
    pub suspect_to_down: Duration,
}

impl Default for FailureDetection {
    fn default() -> Self {
        FailureDetection {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(150),
            suspect_to_down: Duration::from_millis(1000),
        }
    }
}

impl FailureDetection {
    /// The longest time from a node's death until a live node of a cluster of
    /// `members` nodes (itself included) marks it down, if the network delivers.
    ///
    /// Foca probes the other members in a shuffled round-robin, one per probe period:
    /// a member that died just after its probe is probed again at the latest at the
    /// end of the next round, `2 × (members − 1)` periods later; the probe fails one
    /// period after that (direct and indirect probes unanswered), the member becomes
    /// suspect, and after `suspect_to_down` it is down. The down update then reaches
    /// the other nodes with the next gossip (every 100 ms). Every other live member
    /// probes too, so the typical time is much shorter.
    pub fn detection_bound(&self, members: usize) -> Duration {
        let others = members.saturating_sub(1).max(1) as u32;
        self.probe_period * (2 * others + 1) + self.suspect_to_down + Duration::from_millis(200)
    }
}

/// Everything a [`Node`](crate::Node) needs to start.
///
/// ```
/// use std::time::Duration;
/// use pfs_memshare::NodeConfig;
/// let cfg = NodeConfig::new("tcp://127.0.0.1:0")
///     .seed("tcp://127.0.0.1:7100")
///     .op_timeout(Duration::from_secs(5))
///     .task_timeout(Duration::from_secs(30));
/// ```
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address this node listens on; its scheme picks the backend (`tcp://`, `udp://`).
    pub listen: String,
    /// Addresses of nodes to join through (any live member will do).
    pub seeds: Vec<String>,
    /// The cluster secret: every connection, membership traffic included, is
    /// authenticated with it.
    pub secret: Option<Secret>,
    /// Failure-detection timing.
    pub failure_detection: FailureDetection,
    /// Deadline of every one-sided operation (read, write, atomic) and of a copy.
    pub op_timeout: Duration,
    /// Deadline of a dispatched task, from request to result.
    pub task_timeout: Duration,
    /// Deadline of connection setup.
    pub connect_timeout: Duration,
    /// Tasks (and copies) this node runs at once for others; more are refused.
    pub max_concurrent_tasks: usize,
    /// Whether other nodes may ask this node to export regions (striped arrays).
    pub allow_remote_export: bool,
    /// Largest region another node may ask this node to export.
    pub max_remote_export: u64,
}

impl NodeConfig {
    /// Defaults, listening on `listen`.
    pub fn new(listen: impl Into<String>) -> Self {
        NodeConfig {
            listen: listen.into(),
            seeds: Vec::new(),
            secret: None,
            failure_detection: FailureDetection::default(),
            op_timeout: Duration::from_secs(5),
            task_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            max_concurrent_tasks: 64,
            allow_remote_export: true,
            max_remote_export: 1 << 32,
        }
    }

    /// Add a seed address.
    pub fn seed(mut self, addr: impl Into<String>) -> Self {
        self.seeds.push(addr.into());
        self
    }

    /// Add several seed addresses.
    pub fn seeds<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.seeds.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// Set the cluster secret.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Set the failure-detection timing.
    pub fn failure_detection(mut self, fd: FailureDetection) -> Self {
        self.failure_detection = fd;
        self
    }

    /// Set the deadline of one-sided operations.
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }

    /// Set the deadline of dispatched tasks.
    pub fn task_timeout(mut self, d: Duration) -> Self {
        self.task_timeout = d;
        self
    }

    /// Set the deadline of connection setup.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Set how many tasks this node runs at once for others.
    pub fn max_concurrent_tasks(mut self, n: usize) -> Self {
        self.max_concurrent_tasks = n;
        self
    }

    /// Allow or refuse exports requested by other nodes.
    pub fn allow_remote_export(mut self, on: bool) -> Self {
        self.allow_remote_export = on;
        self
    }

    /// Read a TOML configuration file (see [`NodeConfig::from_toml`] for the keys).
    pub fn from_file(path: impl AsRef<Path>) -> Result<NodeConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), strip(e))))
    }

    /// Parse a TOML configuration:
    ///
    /// ```toml
    /// listen = "tcp://127.0.0.1:7100"
    /// seeds = ["tcp://127.0.0.1:7101"]
    /// secret_file = "/etc/packetfs/secret"   # optional
    /// op_timeout_ms = 5000
    /// task_timeout_ms = 30000
    /// connect_timeout_ms = 2000
    /// max_concurrent_tasks = 64
    /// allow_remote_export = true
    /// max_remote_export = 4294967296
    ///
    /// [failure_detection]
    /// probe_period_ms = 500
    /// probe_rtt_ms = 150
    /// suspect_to_down_ms = 1000
    /// ```
    ///
    /// Only `listen` is required. Unknown keys are errors; every error names the key
    /// and the line.
    pub fn from_toml(text: &str) -> Result<NodeConfig> {
        let f: FileConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        let mut c = NodeConfig::new(f.listen);
        c.seeds = f.seeds;
        if let Some(p) = f.secret_file {
            let s = Secret::from_file(&p)
                .map_err(|e| Error::Config(format!("secret_file = {p:?} cannot be used: {e}")))?;
            c.secret = Some(s);
        }
        let ms = Duration::from_millis;
        if let Some(v) = f.op_timeout_ms {
            c.op_timeout = ms(v);
        }
        if let Some(v) = f.task_timeout_ms {
            c.task_timeout = ms(v);
        }
        if let Some(v) = f.connect_timeout_ms {
            c.connect_timeout = ms(v);
        }
        if let Some(v) = f.max_concurrent_tasks {
            c.max_concurrent_tasks = v;
        }
        if let Some(v) = f.allow_remote_export {
            c.allow_remote_export = v;
        }
        if let Some(v) = f.max_remote_export {
            c.max_remote_export = v;
        }
        if let Some(fd) = f.failure_detection {
            if let Some(v) = fd.probe_period_ms {
                c.failure_detection.probe_period = ms(v);
            }
            if let Some(v) = fd.probe_rtt_ms {
                c.failure_detection.probe_rtt = ms(v);
            }
            if let Some(v) = fd.suspect_to_down_ms {
                c.failure_detection.suspect_to_down = ms(v);
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Check the values; every error names the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if let Err(e) = pfs_transport::Address::parse(&self.listen) {
            return bad(format!("listen = {:?}: {e}", self.listen));
        }
        for s in &self.seeds {
            if let Err(e) = pfs_transport::Address::parse(s) {
                return bad(format!("seeds: {s:?}: {e}"));
            }
        }
        let fd = &self.failure_detection;
        if fd.probe_period.is_zero() || fd.probe_rtt.is_zero() || fd.suspect_to_down.is_zero() {
            return bad(
                "failure_detection: probe_period, probe_rtt and suspect_to_down must be positive"
                    .into(),
            );
        }
        if fd.probe_rtt >= fd.probe_period {
            return bad(format!(
                "failure_detection: probe_rtt ({:?}) must be below probe_period ({:?})",
                fd.probe_rtt, fd.probe_period
            ));
        }
        for (k, v) in [
            ("op_timeout", self.op_timeout),
            ("task_timeout", self.task_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if v.is_zero() {
                return bad(format!("{k} must be positive"));
            }
        }
        if self.max_concurrent_tasks == 0 {
            return bad("max_concurrent_tasks must be at least 1".into());
        }
        Ok(())
    }
}

/// Drop the "invalid memshare configuration: " prefix when wrapping.
fn strip(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: String,
    #[serde(default)]
    seeds: Vec<String>,
    secret_file: Option<String>,
    op_timeout_ms: Option<u64>,
    task_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    max_concurrent_tasks: Option<usize>,
    allow_remote_export: Option<bool>,
    max_remote_export: Option<u64>,
    failure_detection: Option<FileFd>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFd {
    probe_period_ms: Option<u64>,
    probe_rtt_ms: Option<u64>,
    suspect_to_down_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let c = NodeConfig::from_toml(
            r#"
listen = "tcp://127.0.0.1:7100"
seeds = ["tcp://127.0.0.1:7101", "udp://127.0.0.1:7102"]
op_timeout_ms = 1500
[failure_detection]
probe_period_ms = 300
probe_rtt_ms = 100
"#,
        )
        .unwrap();
        assert_eq!(c.seeds.len(), 2);
        assert_eq!(c.op_timeout, Duration::from_millis(1500));
        assert_eq!(c.failure_detection.probe_period, Duration::from_millis(300));
        assert_eq!(
            c.failure_detection.suspect_to_down,
            Duration::from_millis(1000)
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = NodeConfig::from_toml("listen = \"tcp://127.0.0.1:0\"\nprobe_perod_ms = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("probe_perod_ms"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_values_are_named() {
        let e = NodeConfig::from_toml("listen = \"tcp://127.0.0.1:0\"\nop_timeout_ms = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("op_timeout_ms") && e.contains("line 2"), "{e}");
        let e = NodeConfig::from_toml("seeds = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
        let e = NodeConfig::from_toml(
            "listen = \"tcp://127.0.0.1:0\"\n[failure_detection]\nprobe_rtt_ms = 900\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("probe_rtt"), "{e}");
        let e = NodeConfig::from_toml("listen = \"bogus://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listen"), "{e}");
    }
}
