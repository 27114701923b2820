//! Datagram I/O: batch transmit and receive behind one narrow trait, so that the
//! reliable datagram protocol runs unchanged over kernel UDP (io_uring), AF_XDP, or the
//! simulated link used by the tests.

pub(crate) mod sim;

use std::net::SocketAddr;
use std::time::Instant;

/// A datagram driver: where datagrams go out and come in, and what time it is.
pub(crate) trait Driver: Send {
    /// The driver's clock (virtual for the simulated link).
    fn now(&self) -> Instant;
    /// Queue one datagram for `to`; it leaves at the latest on [`flush`](Driver::flush).
    fn send(&mut self, to: SocketAddr, datagram: &[u8]);
    /// Push queued datagrams to the network (batched: several per system call).
    fn flush(&mut self);
    /// Hand every datagram that has arrived to `f(from, bytes)`; returns how many.
    fn recv(&mut self, f: &mut dyn FnMut(SocketAddr, &[u8])) -> usize;
    /// Block until a datagram may have arrived, `until` passes, or [`Waker::wake`] is
    /// called. The simulated link advances virtual time instead.
    fn wait(&mut self, until: Option<Instant>);
    /// The local address datagrams come from.
    fn local_addr(&self) -> SocketAddr;
    /// One line on how the driver is set up.
    fn describe(&self) -> String;
}
