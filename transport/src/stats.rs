//! Counters per connection and per endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A counter's index.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        #[repr(usize)]
        pub(crate) enum C { $( $name ),* }

        const N: usize = [$( stringify!($name) ),*].len();

        /// A snapshot of counters. Connection counters cover one connection; endpoint
        /// counters cover every connection the endpoint ever had.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Stats {
            /// `(name, value)` pairs, for printing and JSON.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name) ),* ]
            }
        }

        impl Counters {
            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $( $name: self.v[C::$name as usize].load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Operations submitted (one-sided ops, sends, fences).
    ops_submitted,
    /// Operations that completed successfully.
    ops_completed,
    /// Operations that failed (including timeouts).
    ops_failed,
    /// Operations that failed because their deadline passed.
    ops_timed_out,
    /// Bytes written to remote regions by completed writes.
    bytes_written,
    /// Bytes read from remote regions by completed reads.
    bytes_read,
    /// Messages sent and acknowledged.
    messages_sent,
    /// Messages received.
    messages_received,
    /// Payload bytes of messages sent.
    message_bytes_sent,
    /// Payload bytes of messages received.
    message_bytes_received,
    /// Remote one-sided operations executed against this side's regions.
    remote_ops_served,
    /// Remote operations refused (bad key, rights, bounds, revoked, expired).
    remote_ops_refused,
    /// Bytes remote peers placed into this side's regions.
    bytes_placed,
    /// Bytes remote peers read from this side's regions.
    bytes_served,
    /// Payload bytes copied by this process (staging buffer to destination) on top of
    /// the kernel's copies: the rest of received payload was placed by the kernel
    /// directly at its destination.
    bytes_copied_in_user_space,
    /// Zero-copy sends completed (see `EndpointConfig::zero_copy_send`).
    zero_copy_sends,
    /// Zero-copy sends whose data the kernel copied after all (loopback, veth, …).
    zero_copy_sends_copied,
    /// Write notifications delivered to this side.
    notifications,
    /// Incoming data discarded: payloads of refused writes, late responses.
    drops,
    /// Datagrams sent (datagram backends).
    datagrams_sent,
    /// Datagrams received (datagram backends).
    datagrams_received,
    /// Datagrams sent again after a loss was detected or a timer fired (datagram
    /// backends).
    retransmissions,
    /// Malformed or unexpected input from the network.
    protocol_errors,
    /// Connections refused because the peer did not prove it holds the cluster secret
    /// (target side), or did not prove it to us (initiator side).
    auth_failures,
    /// Datagrams dropped because their integrity tag was missing or wrong
    /// (`EndpointConfig::datagram_integrity`).
    integrity_failures,
    /// Connection attempts refused because their source IP address already had
    /// `max_handshakes_per_peer` connections in their handshake.
    handshakes_refused,
    /// Connections refused because their source IP address already had
    /// `max_connections_per_peer` connections.
    peer_connections_refused,
    /// Times reading from a peer was paused because the application had not taken what
    /// arrived (`max_incoming` messages or `max_incoming_bytes` queued); the peer is held
    /// back by flow control, nothing is lost.
    receive_stalls,
    /// Messages that had arrived whole but were still held back for an earlier one
    /// when their connection closed (datagram backends deliver a connection's messages
    /// in order): never delivered, and their senders' `send`s failed.
    messages_discarded,
    /// Errors of any kind (local and remote, including protocol errors).
    errors,
    /// Connections established.
    connections_opened,
    /// Connections closed or lost.
    connections_closed,
}

/// Live atomic counters.
#[derive(Debug)]
pub(crate) struct Counters {
    v: [AtomicU64; N],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            v: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    #[inline]
    pub(crate) fn add(&self, c: C, n: u64) {
        self.v[c as usize].fetch_add(n, Ordering::Relaxed);
    }
}
