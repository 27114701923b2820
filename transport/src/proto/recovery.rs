//! Round-trip time estimation and congestion control.

use std::time::Duration;

/// RFC 6298 round-trip estimator.
#[derive(Debug, Clone)]
pub(crate) struct Rtt {
    srtt: Option<Duration>,
    min: Option<Duration>,
    rttvar: Duration,
    initial: Duration,
    min_rto: Duration,
    max_rto: Duration,
}

impl Rtt {
    pub(crate) fn new(initial: Duration, min_rto: Duration, max_rto: Duration) -> Rtt {
        Rtt {
            srtt: None,
            min: None,
            rttvar: initial / 2,
            initial,
            min_rto,
            max_rto,
        }
    }

    /// Feed one sample (never from a retransmitted packet: Karn's rule).
    pub(crate) fn sample(&mut self, r: Duration) {
        self.min = Some(self.min.map_or(r, |m| m.min(r)));
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
    }

    /// Smoothed RTT (the initial guess before any sample).
    pub(crate) fn srtt(&self) -> Duration {
        self.srtt.unwrap_or(self.initial)
    }

    /// Retransmission timeout before backoff.
    pub(crate) fn rto(&self) -> Duration {
        let base = self.srtt() + (self.rttvar * 4).max(Duration::from_micros(10));
        base.clamp(self.min_rto, self.max_rto)
    }

    pub(crate) fn max_rto(&self) -> Duration {
        self.max_rto
    }

    /// Whether a queue has built up on the path: the smoothed RTT is well above the
    /// smallest one seen.
    pub(crate) fn queue_building(&self) -> bool {
        match (self.srtt, self.min) {
            (Some(s), Some(m)) => s > m * 3 / 2 + Duration::from_micros(20),
            _ => false,
        }
    }
}

/// Window-based congestion control with DCTCP's control law, driven by the fraction of
/// packets *lost* per window where DCTCP uses the fraction of ECN-marked ones.
///
/// * Slow start (+1 per packet acknowledged) until the first loss, then congestion
///   avoidance (+1 packet per window acknowledged).
/// * `alpha` is a moving average (gain 1/8, per window of packets) of the fraction of
///   packets lost. It starts at 1, so the first loss halves the window like Reno.
/// * At most once per round trip (a loss epoch ends once everything sent before the loss
///   has been acknowledged), a loss multiplies the window by `1 - alpha/2`: random loss of
///   1% costs about half a percent per round trip, while a queue overflowing at a
///   bottleneck loses a large share of a window and backs the sender off hard.
/// * When the round-trip time shows a queue building on the path (smoothed RTT above 1.5×
///   the smallest seen), a loss is taken as congestion and multiplies the window by at
///   most 0.7 (as CUBIC does), so the sender settles just above the path's
///   bandwidth-delay product instead of at the point where the queue overflows.
/// * A retransmission timeout resets the window to the minimum (the path may be gone).
#[derive(Debug, Clone)]
pub(crate) struct Cc {
    cwnd: u32,
    ssthresh: u32,
    /// Packets acknowledged towards the next +1 in congestion avoidance.
    acc: u32,
    /// Losses of packets numbered before this do not reduce the window again.
    recovery_until: Option<u32>,
    alpha: f64,
    /// This window's counts, and the packet number that ends it.
    win_acked: u32,
    win_lost: u32,
    win_end: Option<u32>,
    min: u32,
    max: u32,
}

const ALPHA_GAIN: f64 = 1.0 / 8.0;

impl Cc {
    pub(crate) fn new(initial: u32, max: u32) -> Cc {
        Cc {
            cwnd: initial.clamp(2, max.max(2)),
            ssthresh: u32::MAX,
            acc: 0,
            recovery_until: None,
            alpha: 1.0,
            win_acked: 0,
            win_lost: 0,
            win_end: None,
            min: 2,
            max: max.max(2),
        }
    }

    pub(crate) fn window(&self) -> u32 {
        self.cwnd
    }

    /// The current loss-fraction estimate.
    #[cfg(test)]
    pub(crate) fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `n` packets newly acknowledged; everything before `cumulative` has been; the next
    /// packet sent will be `next_seq`.
    pub(crate) fn on_ack(&mut self, n: u32, cumulative: u32, next_seq: u32) {
        self.win_acked += n;
        match self.win_end {
            None => self.win_end = Some(next_seq),
            Some(end) if super::packet::seq_le(end, cumulative) => {
                let total = self.win_acked + self.win_lost;
                if total > 0 {
                    let f = f64::from(self.win_lost) / f64::from(total);
                    self.alpha = (1.0 - ALPHA_GAIN) * self.alpha + ALPHA_GAIN * f;
                }
                self.win_acked = 0;
                self.win_lost = 0;
                self.win_end = Some(next_seq);
            }
            Some(_) => {}
        }
        if self.cwnd < self.ssthresh {
            self.cwnd = (self.cwnd + n).min(self.max);
        } else {
            self.acc += n;
            if self.acc >= self.cwnd {
                self.acc -= self.cwnd;
                self.cwnd = (self.cwnd + 1).min(self.max);
            }
        }
    }

    /// Packet `seq` was lost; `next_seq` is the next packet number to be sent;
    /// `queue_building` says whether the RTT shows a queue on the path.
    pub(crate) fn on_loss(&mut self, seq: u32, next_seq: u32, queue_building: bool) {
        self.win_lost += 1;
        if let Some(r) = self.recovery_until
            && super::packet::seq_lt(seq, r)
        {
            return;
        }
        let mut factor = 1.0 - self.alpha / 2.0;
        if queue_building {
            factor = factor.min(0.7);
        }
        self.ssthresh = ((f64::from(self.cwnd) * factor) as u32).max(self.min);
        self.cwnd = self.ssthresh;
        self.acc = 0;
        self.recovery_until = Some(next_seq);
    }

    /// A retransmission timeout: the path may be broken; start over.
    pub(crate) fn on_timeout(&mut self, next_seq: u32) {
        self.ssthresh = (self.cwnd / 2).max(self.min);
        self.cwnd = self.min;
        self.acc = 0;
        self.recovery_until = Some(next_seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_follows_rfc6298() {
        let mut r = Rtt::new(
            Duration::from_millis(10),
            Duration::from_micros(100),
            Duration::from_secs(1),
        );
        assert_eq!(r.srtt(), Duration::from_millis(10));
        r.sample(Duration::from_millis(2));
        assert_eq!(r.srtt(), Duration::from_millis(2));
        assert_eq!(r.rto(), Duration::from_millis(2) + Duration::from_millis(4));
        for _ in 0..50 {
            r.sample(Duration::from_millis(1));
        }
        assert!(r.srtt() < Duration::from_micros(1100));
        assert!(r.rto() >= Duration::from_micros(100));
    }

    #[test]
    fn cc_backs_off_once_per_epoch_and_recovers() {
        let mut c = Cc::new(10, 1000);
        c.on_ack(10, 10, 20);
        assert_eq!(c.window(), 20, "slow start doubles per round");
        c.on_loss(5, 30, false);
        assert_eq!(c.window(), 10, "alpha starts at 1: the first loss halves");
        c.on_loss(6, 30, false);
        assert_eq!(c.window(), 10, "one reduction per loss epoch");
        for i in 0..10 {
            c.on_ack(1, 31 + i, 40);
        }
        assert_eq!(c.window(), 11, "additive increase: +1 per window");
        c.on_timeout(50);
        assert_eq!(c.window(), 2);
        c.on_ack(2, 52, 60);
        assert_eq!(c.window(), 4, "slow start again after a timeout");
    }

    #[test]
    fn alpha_tracks_the_loss_fraction() {
        let mut c = Cc::new(100, 10_000);
        let mut seq = 0u32;
        // Many windows of 100 packets with one loss each: alpha converges near 1%.
        for _ in 0..200 {
            for _ in 0..99 {
                seq += 1;
                c.on_ack(1, seq, seq + 100);
            }
            seq += 1;
            c.on_loss(seq, seq + 100, false);
        }
        assert!(c.alpha() < 0.03, "alpha {}", c.alpha());
        let w = c.window();
        c.on_loss(seq + 200, seq + 300, false);
        assert!(
            c.window() >= w * 98 / 100,
            "a 1% loss rate costs little: {w} -> {}",
            c.window()
        );
        // Heavy loss drives alpha up and the window down.
        for _ in 0..30 {
            for _ in 0..50 {
                seq += 1;
                c.on_ack(1, seq, seq + 100);
            }
            for _ in 0..50 {
                seq += 1;
                c.on_loss(seq, seq + 100, false);
            }
        }
        assert!(c.alpha() > 0.3, "alpha {}", c.alpha());
        // With a queue building, a loss costs at least 30%.
        let w = c.window();
        c.on_loss(seq + 1000, seq + 2000, true);
        assert!(c.window() <= w * 7 / 10);
    }
}
