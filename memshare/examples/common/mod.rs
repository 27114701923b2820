//! Shared by the examples: a small cluster of node processes on loopback, made by
//! re-executing the example binary in node mode.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use pfs_memshare::{Node, NodeConfig, builtin};

/// Set in a node process: the seed address, or `-` for the first node.
const NODE_ENV: &str = "PFS_MEMSHARE_EXAMPLE_NODE";
const NODE_LINE: &str = "PFS-MEMSHARE-NODE ";
/// Node processes exit on their own after this long.
const NODE_LIFETIME: Duration = Duration::from_secs(300);

/// A node process of the example's cluster.
pub struct NodeProcess {
    child: Child,
    /// Its address.
    pub addr: String,
    /// Its node id.
    pub id: u64,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // Closing stdin tells the node to leave; kill it if it does not.
        drop(self.child.stdin.take());
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a node process (re-executed example), run the node and exit; otherwise return.
pub fn run_node_if_asked() {
    let Ok(seed) = std::env::var(NODE_ENV) else {
        return;
    };
    let mut cfg = NodeConfig::new("tcp://127.0.0.1:0");
    if seed != "-" {
        cfg = cfg.seed(seed);
    }
    let node = Node::start(cfg).unwrap_or_else(|e| {
        eprintln!("node: {e}");
        std::process::exit(1)
    });
    builtin::register(&node);
    println!("{NODE_LINE}{} {:x}", node.addr(), node.id());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(NODE_LIFETIME);
    drop(node);
    std::process::exit(0)
}

/// Start `n` node processes joined through the first.
pub fn start_cluster(n: usize) -> Result<Vec<NodeProcess>, String> {
    let mut procs: Vec<NodeProcess> = Vec::new();
    for _ in 0..n {
        let seed = procs.first().map_or("-".to_string(), |p| p.addr.clone());
        procs.push(spawn(&seed)?);
    }
    Ok(procs)
}

fn spawn(seed: &str) -> Result<NodeProcess, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .env(NODE_ENV, seed)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawning a node process: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(NODE_LINE) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "a node process did not start within 20 s".to_string())?;
    let (addr, id) = line.split_once(' ').ok_or("bad node line")?;
    Ok(NodeProcess {
        child,
        addr: addr.to_string(),
        id: u64::from_str_radix(id, 16).map_err(|e| e.to_string())?,
    })
}
