//! Datagram I/O: batch transmit and receive behind one narrow trait, so that the
//! reliable datagram protocol runs unchanged over kernel UDP (io_uring), AF_XDP, or the
//! simulated link used by the tests.

#[cfg(test)]
pub(crate) mod sim;
pub(crate) mod udp;
#[cfg(feature = "xdp")]
pub(crate) mod xdp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// How long a blocking driver may sleep before `until`: at most 50 ms, so a lost wake-up
/// costs little.
pub(crate) fn sleep_budget(until: Option<Instant>) -> std::time::Duration {
    let cap = std::time::Duration::from_millis(50);
    until.map_or(cap, |u| {
        u.saturating_duration_since(Instant::now()).min(cap)
    })
}

/// Wakes a driver blocked in [`Driver::wait`] from another thread.
pub(crate) trait Wake: Send + Sync {
    fn wake(&self);
}

/// A datagram driver: where datagrams go out and come in, and what time it is.
pub(crate) trait Driver: Send {
    /// Set up what must live on the thread that drives the driver (an io_uring created
    /// single-issuer by a dedicated progress thread).
    fn start(&mut self, _dedicated: bool) -> std::io::Result<()> {
        Ok(())
    }
    /// The driver's clock (virtual for the simulated link).
    fn now(&self) -> Instant;
    /// Queue one datagram for `to`; it leaves at the latest on [`flush`](Driver::flush).
    fn send(&mut self, to: SocketAddr, datagram: &[u8]);
    /// An empty buffer to build a datagram in, for [`send_owned`](Driver::send_owned).
    fn take_buffer(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// Queue a datagram built in a buffer from [`take_buffer`](Driver::take_buffer),
    /// without copying it again.
    fn send_owned(&mut self, to: SocketAddr, datagram: Vec<u8>) {
        self.send(to, &datagram);
    }
    /// A gather list to build a datagram in, if the driver can send payloads straight
    /// from where they live (no user-space copy); `None` otherwise.
    fn take_gather(&mut self) -> Option<crate::sys::net::Datagram> {
        None
    }
    /// Queue a datagram built in a gather list from [`take_gather`](Driver::take_gather).
    fn send_gather(&mut self, _to: SocketAddr, _datagram: crate::sys::net::Datagram) {}
    /// Give back an unused gather list.
    fn return_gather(&mut self, _datagram: crate::sys::net::Datagram) {}
    /// Push queued datagrams to the network (batched: several per system call).
    fn flush(&mut self);
    /// Hand every datagram that has arrived to `f(from, bytes)`; returns how many.
    fn recv(&mut self, f: &mut dyn FnMut(SocketAddr, &[u8])) -> usize;
    /// Block until a datagram may have arrived, `until` passes, or the waker is called.
    fn wait(&mut self, until: Option<Instant>);
    /// Tell the driver when the caller next needs to run (the simulated world uses it
    /// to decide how far virtual time may jump; real drivers ignore it).
    fn next_timer(&mut self, _at: Option<Instant>) {}
    /// Whether [`next_timer`](Driver::next_timer) is worth calling.
    fn wants_timer(&self) -> bool {
        false
    }
    /// Frames the driver threw away since the last call: (received frames that were not
    /// valid datagrams for us, datagrams it could not send).
    fn take_drops(&mut self) -> (u64, u64) {
        (0, 0)
    }
    /// A handle that interrupts [`wait`](Driver::wait).
    fn waker(&self) -> Arc<dyn Wake>;
    /// Random bits for connection ids and first packet numbers (seeded in simulation).
    fn random_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        u32::from_le_bytes(b)
    }
    /// The local address datagrams come from.
    fn local_addr(&self) -> SocketAddr;
    /// One line on how the driver is set up.
    fn describe(&self) -> String;
}
