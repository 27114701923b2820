//! Endpoint configuration.

use std::time::Duration;

use crate::addr::Address;
use crate::error::{Error, Result};

/// Who drives the endpoint's progress engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A progress thread per backend, started by [`Endpoint::bind`](crate::Endpoint::bind).
    Thread {
        /// Pin the progress thread to this CPU.
        cpu: Option<usize>,
    },
    /// The application calls [`Endpoint::progress`](crate::Endpoint::progress); waiting on
    /// an operation, a message or an accept drives progress itself. This is the
    /// lowest-latency mode: no thread hand-off at all.
    Caller,
}

/// How waiting works: spinning or sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Spin: the progress thread (or a waiting caller) never sleeps. Lowest latency, one
    /// busy core per spinning thread.
    BusyPoll,
    /// Sleep in the kernel until something happens. No CPU when idle; each wake-up of a
    /// thread on another core costs tens of microseconds.
    Block,
}

/// Everything an [`Endpoint`](crate::Endpoint) needs to start.
///
/// ```
/// use std::time::Duration;
/// use pfs_transport::{EndpointConfig, Progress, WaitMode};
/// let cfg = EndpointConfig::new()
///     .listen("tcp://127.0.0.1:0")?
///     .progress(Progress::Caller)
///     .wait_mode(WaitMode::BusyPoll)
///     .op_timeout(Duration::from_secs(5));
/// # Ok::<(), pfs_transport::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointConfig {
    /// Addresses to listen on (empty: the endpoint only connects out).
    pub listen: Vec<Address>,
    /// Who drives progress.
    pub progress: Progress,
    /// Spin or sleep while waiting.
    pub wait: WaitMode,
    /// Deadline of every operation, from submission to completion.
    pub op_timeout: Duration,
    /// Deadline of connection setup (TCP connect plus handshake).
    pub connect_timeout: Duration,
    /// Operations in flight per connection; more fail with `WouldBlock`.
    pub max_ops_in_flight: usize,
    /// Submissions waiting for the progress engine, per backend.
    pub max_queued_ops: usize,
    /// Connections per endpoint (accepted plus connected).
    pub max_connections: usize,
    /// Accepted connections waiting for [`Endpoint::accept`](crate::Endpoint::accept).
    pub max_pending_accepts: usize,
    /// Connections from one IP address still in their handshake (not yet established
    /// or authenticated); more are refused and counted (`handshakes_refused`), so that a
    /// flood from one source cannot use up `max_connections`.
    pub max_handshakes_per_peer: usize,
    /// Largest one-sided operation (bytes).
    pub max_op_size: u64,
    /// Largest two-sided message (bytes).
    pub max_message_size: usize,
    /// Received messages (and write notifications) queued per connection before the
    /// sender is slowed down.
    pub max_incoming: usize,
    /// Bytes of received messages queued per connection before the sender is slowed
    /// down (the queue may exceed it by one message, or by what one datagram carries).
    /// With `max_connections_per_peer`, this bounds the receive memory one peer can
    /// take: nothing is dropped, the peer waits (counter `receive_stalls`).
    pub max_incoming_bytes: usize,
    /// Connections from one IP address (in handshake or established); more are
    /// refused and counted (`peer_connections_refused`). Together with the per-connection
    /// limits (`max_incoming_bytes`, and the protocol's window of operations being
    /// served) it bounds what one peer can make this endpoint hold.
    pub max_connections_per_peer: usize,
    /// Try huge pages for allocated regions whose length is a multiple of 2 MiB.
    pub huge_pages: bool,
    /// Kernel socket buffer size for TCP connections (0 leaves the kernel's default).
    pub socket_buffer: usize,
    /// Send payloads of at least this many bytes with zero-copy sends
    /// (`IORING_OP_SENDMSG_ZC`): the NIC reads them from the region, and the send
    /// completes only when the kernel lets go of the pages. Off by default: on loopback
    /// and veth the kernel copies anyway at delivery, and measured slower (`pfs-bench
    /// client --zero-copy-send`); worth trying with a real NIC and large writes.
    pub zero_copy_send: Option<usize>,
    /// Link MTU for the datagram backends (`udp`, `xdp`): datagrams carry up to this
    /// minus the IP and UDP headers. 1500 by default; 9000 for jumbo frames; up to 65535
    /// on loopback.
    pub mtu: usize,
    /// Fault injection for loss tests on the `xdp` backend: the XDP program drops this
    /// many per million of the packets it steers to the endpoint's interface (0, the
    /// default, drops nothing). Applies to everything the interface receives for
    /// PacketFS, whichever endpoint set it.
    pub fault_drop_per_million: u32,
    /// The cluster secret. With one, the endpoint authenticates every connection both
    /// ways at setup (`docs/security.md`) and refuses peers that do not hold the same
    /// secret, before they can reach any region. Without one, it accepts only peers
    /// that do not ask for authentication either.
    pub secret: Option<crate::Secret>,
    /// Per-datagram integrity on the datagram backends (`udp`, `xdp`): every datagram
    /// after INIT carries a keyed BLAKE3 tag under per-connection session keys derived
    /// from the secret, and a datagram whose tag is missing or wrong is dropped and
    /// counted (`integrity_failures`), so an on-path attacker cannot inject or alter
    /// data in an authenticated connection. Needs `secret`. An initiator with it on
    /// asks for it; a target with it on also refuses peers that do not ask. Off by
    /// default: it costs a hash of every byte (`pfs-bench run --integrity`); `tcp`
    /// ignores it.
    pub datagram_integrity: bool,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            listen: Vec::new(),
            progress: Progress::Thread { cpu: None },
            wait: WaitMode::Block,
            op_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_ops_in_flight: 1024,
            max_queued_ops: 16384,
            max_connections: 1024,
            max_pending_accepts: 128,
            max_handshakes_per_peer: 64,
            max_op_size: 1 << 31,
            max_message_size: 4 << 20,
            max_incoming: 1024,
            max_incoming_bytes: 64 << 20,
            max_connections_per_peer: 256,
            huge_pages: true,
            socket_buffer: 0,
            zero_copy_send: None,
            mtu: 1500,
            fault_drop_per_million: 0,
            secret: None,
            datagram_integrity: false,
        }
    }
}

impl EndpointConfig {
    /// The defaults: no listeners, a blocking progress thread, 30 s op deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a listen address (`tcp://0.0.0.0:7000`, `auto://0.0.0.0:7000`, port 0 for any).
    pub fn listen(mut self, addr: &str) -> Result<Self> {
        self.listen.push(Address::parse(addr)?);
        Ok(self)
    }

    /// Set who drives progress.
    pub fn progress(mut self, p: Progress) -> Self {
        self.progress = p;
        self
    }

    /// Set the wait mode.
    pub fn wait_mode(mut self, w: WaitMode) -> Self {
        self.wait = w;
        self
    }

    /// Set the per-operation deadline.
    pub fn op_timeout(mut self, d: Duration) -> Self {
        self.op_timeout = d;
        self
    }

    /// Set the connection setup deadline.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Set the per-connection in-flight limit.
    pub fn max_ops_in_flight(mut self, n: usize) -> Self {
        self.max_ops_in_flight = n;
        self
    }

    /// Use zero-copy sends for payloads of at least `min_bytes` (see the field).
    pub fn zero_copy_send(mut self, min_bytes: usize) -> Self {
        self.zero_copy_send = Some(min_bytes);
        self
    }

    /// Set the link MTU of the datagram backends.
    pub fn mtu(mut self, mtu: usize) -> Self {
        self.mtu = mtu;
        self
    }

    /// Drop `n` per million of the packets the XDP program steers (see the field).
    pub fn fault_drop_per_million(mut self, n: u32) -> Self {
        self.fault_drop_per_million = n;
        self
    }

    /// Require peers to prove they hold `secret`, and prove it to them.
    pub fn secret(mut self, secret: crate::Secret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Turn per-datagram integrity on (see the field; needs a secret).
    pub fn datagram_integrity(mut self, on: bool) -> Self {
        self.datagram_integrity = on;
        self
    }

    /// Set the largest message size.
    pub fn max_message_size(mut self, n: usize) -> Self {
        self.max_message_size = n;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::InvalidArgument(what.to_string()));
        if self.op_timeout.is_zero() {
            return bad("op_timeout must be positive");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be positive");
        }
        if self.max_ops_in_flight == 0
            || self.max_queued_ops == 0
            || self.max_connections == 0
            || self.max_pending_accepts == 0
            || self.max_handshakes_per_peer == 0
            || self.max_incoming == 0
            || self.max_incoming_bytes == 0
            || self.max_connections_per_peer == 0
        {
            return bad("queue limits must be at least 1");
        }
        if self.max_op_size == 0 || self.max_op_size > u64::from(u32::MAX) {
            return bad("max_op_size must be between 1 and 4294967295 bytes");
        }
        if !(576..=65535).contains(&self.mtu) {
            return Err(Error::InvalidArgument(format!(
                "mtu {} is out of range: 576..=65535 (1500 for Ethernet, 9000 for jumbo \
                 frames, 65535 on loopback)",
                self.mtu
            )));
        }
        if self.max_message_size > u32::MAX as usize {
            return bad("max_message_size must be below 4 GiB");
        }
        if self.datagram_integrity && self.secret.is_none() {
            return bad(
                "datagram_integrity needs a cluster secret: its session keys derive from it \
                 (set secret, e.g. Secret::from_file)",
            );
        }
        if let Progress::Thread { cpu: Some(c) } = self.progress
            && c >= crate::sys::online_cpus()
        {
            return Err(Error::InvalidArgument(format!(
                "progress thread cpu {c} does not exist (this machine has {} cpus: 0..={})",
                crate::sys::online_cpus(),
                crate::sys::online_cpus() - 1
            )));
        }
        Ok(())
    }

    /// Largest UDP payload for the given IP version at this MTU.
    pub(crate) fn max_datagram(&self, ipv6: bool) -> usize {
        let headers = if ipv6 { 48 } else { 28 };
        (self.mtu - headers).min(65_507)
    }

    /// Largest payload this endpoint accepts in one wire message.
    pub(crate) fn max_payload(&self) -> u32 {
        let m = self.max_op_size.max(self.max_message_size as u64);
        m.min(u64::from(u32::MAX)) as u32
    }
}
