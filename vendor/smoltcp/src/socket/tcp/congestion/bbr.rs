//! BBR (version 1) congestion control: a model of the path (bottleneck bandwidth and round-trip
//! propagation time) instead of a reaction to loss. After draft-cardwell-iccrg-bbr-congestion-control
//! and Linux's `tcp_bbr.c`.
//!
//! Not part of upstream smoltcp 0.14.0: added with the `socket-tcp-bbr` feature (see PATCHES.md).
//! It needs the delivery-rate samples of the loss-recovery log (`socket-tcp-rack`) and pacing,
//! which the socket applies from [`Controller::pacing_rate`].
//!
//! Random loss (a lossy radio or WAN link) does not shrink the window: BBR keeps sending at the
//! measured bottleneck rate, where a loss-based controller such as CUBIC falls to a few segments
//! per round trip. Losses during recovery are handled by packet conservation for one round.
//!
//! One addition from BBRv2: a round that loses more than `LOSS_THRESH` of what it sent is not random
//! loss but a queue overflowing (a shallow buffer at the bottleneck, where v1 keeps its window of
//! two BDPs and drowns the path in retransmissions). It caps what may be in flight at 0.7 of what was
//! in flight then; the cap grows back by an eighth each round without such loss.

use crate::time::{Duration, Instant};

use super::super::RttEstimator;
use super::super::recovery::RateSample;
use super::Controller;

/// 2/ln(2): the smallest gain that doubles the sending rate every round trip in startup.
const HIGH_GAIN: f64 = 2.885;
const DRAIN_GAIN: f64 = 1.0 / HIGH_GAIN;
const CWND_GAIN: f64 = 2.0;
/// Pacing gains of the eight phases of ProbeBW: probe for more, drain what the probe queued, cruise.
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Bandwidth samples are kept for this many round trips.
const BW_WINDOW_ROUNDS: u64 = 10;
/// The minimum RTT is kept this long before ProbeRTT refreshes it.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
const PROBE_RTT_DURATION: Duration = Duration::from_millis(200);
/// Startup ends when the bandwidth grew less than 25% for three rounds in a row.
const FULL_BW_THRESH: f64 = 1.25;
const FULL_BW_COUNT: u32 = 3;
const MIN_CWND_SEGMENTS: usize = 4;
const INITIAL_CWND_SEGMENTS: usize = 10;
/// Linux paces 1% below the estimate so a queue left by a probe can drain.
const PACING_MARGIN: f64 = 0.99;
/// ACK aggregation: the window also covers the most data that arrived acknowledged in a burst above
/// what the bandwidth explains (Linux's `extra_acked`), up to this long at the bottleneck rate.
/// Receivers and event loops that work in batches (this one, or a host under load) acknowledge in
/// bursts, and a window of twice the bare BDP would then stall between them.
const EXTRA_ACKED_MAX: Duration = Duration::from_millis(100);
const EXTRA_ACKED_WINDOW_ROUNDS: u64 = 5;
const ACK_EPOCH_RESET: u64 = 1 << 20;
/// Loss in one round beyond this fraction is congestion, not a lossy link.
const LOSS_THRESH: f64 = 0.15;
const LOSS_BETA: f64 = 0.7;
const DEFAULT_MSS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum Mode {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

/// Kathleen Nichols' windowed max filter (as Linux's `win_minmax`): the best of three samples
/// spread over the window.
#[derive(Debug, Default, Clone, Copy)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
struct MaxFilter {
    s: [(u64, u64); 3],
}

impl MaxFilter {
    fn get(&self) -> u64 {
        self.s[0].1
    }

    fn update(&mut self, win: u64, t: u64, v: u64) -> u64 {
        let val = (t, v);
        if v >= self.s[0].1 || t.saturating_sub(self.s[2].0) > win {
            self.s = [val; 3];
            return v;
        }
        if v >= self.s[1].1 {
            self.s[2] = val;
            self.s[1] = val;
        } else if v >= self.s[2].1 {
            self.s[2] = val;
        }
        let dt = t.saturating_sub(self.s[0].0);
        if dt > win {
            self.s[0] = self.s[1];
            self.s[1] = self.s[2];
            self.s[2] = val;
            if t.saturating_sub(self.s[0].0) > win {
                self.s[0] = self.s[1];
                self.s[1] = self.s[2];
                self.s[2] = val;
            }
        } else if self.s[1].0 == self.s[0].0 && dt > win / 4 {
            self.s[2] = val;
            self.s[1] = val;
        } else if self.s[2].0 == self.s[1].0 && dt > win / 2 {
            self.s[2] = val;
        }
        self.s[0].1
    }
}

#[derive(Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Bbr {
    mode: Mode,
    mss: usize,
    cwnd: usize,
    prior_cwnd: usize,
    /// Bottleneck bandwidth, bytes per second.
    bw: MaxFilter,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Instant,
    round_count: u64,
    next_round_delivered: u64,
    round_start: bool,
    full_bw: u64,
    full_bw_count: u32,
    filled_pipe: bool,
    cycle_index: usize,
    cycle_stamp: Instant,
    pacing_gain: f64,
    cwnd_gain: f64,
    probe_rtt_done: Option<Instant>,
    probe_rtt_round_done: bool,
    /// Recovery: for its first round the window only replaces what was delivered.
    conservation: bool,
    in_recovery: bool,
    /// After a timeout the window is restored once a round has passed.
    restore_after_round: bool,
    /// Bytes per second; zero until the first sample.
    pacing_rate: u64,
    srtt_hint: Option<Duration>,
    now: Instant,
    ack_epoch_start: Instant,
    ack_epoch_acked: u64,
    /// Two slots of the largest extra acked bytes, each covering EXTRA_ACKED_WINDOW_ROUNDS.
    extra_acked: [u64; 2],
    extra_acked_slot: usize,
    extra_acked_slot_round: u64,
    /// Bytes delivered and lost in the current round.
    round_delivered: u64,
    round_lost: u64,
    /// The most that may be in flight after heavy loss; `None` while no round lost too much.
    inflight_hi: Option<usize>,
}

impl Bbr {
    pub fn new() -> Bbr {
        Bbr {
            mode: Mode::Startup,
            mss: DEFAULT_MSS,
            cwnd: INITIAL_CWND_SEGMENTS * DEFAULT_MSS,
            prior_cwnd: 0,
            bw: MaxFilter::default(),
            min_rtt: None,
            min_rtt_stamp: Instant::ZERO,
            round_count: 0,
            next_round_delivered: 0,
            round_start: false,
            full_bw: 0,
            full_bw_count: 0,
            filled_pipe: false,
            cycle_index: 0,
            cycle_stamp: Instant::ZERO,
            pacing_gain: HIGH_GAIN,
            cwnd_gain: HIGH_GAIN,
            probe_rtt_done: None,
            probe_rtt_round_done: false,
            conservation: false,
            in_recovery: false,
            restore_after_round: false,
            pacing_rate: 0,
            srtt_hint: None,
            now: Instant::ZERO,
            ack_epoch_start: Instant::ZERO,
            ack_epoch_acked: 0,
            extra_acked: [0; 2],
            extra_acked_slot: 0,
            extra_acked_slot_round: 0,
            round_delivered: 0,
            round_lost: 0,
            inflight_hi: None,
        }
    }

    /// At the end of each round: a round that lost too much sets the in-flight cap; clean rounds
    /// raise it until it no longer binds.
    fn update_loss_cap(&mut self, prior_in_flight: usize) {
        let sent = self.round_delivered + self.round_lost;
        let heavy = sent > 0 && self.round_lost as f64 > LOSS_THRESH * sent as f64;
        if heavy {
            let base = self.inflight_hi.map_or(prior_in_flight, |hi| hi.min(prior_in_flight));
            self.inflight_hi = Some(((base as f64 * LOSS_BETA) as usize).max(MIN_CWND_SEGMENTS * self.mss));
        } else if let Some(hi) = self.inflight_hi {
            let raised = hi + (hi / 8).max(self.mss);
            let unbound = self.bdp(CWND_GAIN) + self.aggregation_cwnd() + 3 * self.mss;
            self.inflight_hi = (raised < unbound).then_some(raised);
        }
        self.round_delivered = 0;
        self.round_lost = 0;
    }

    /// Estimates ACK aggregation (after Linux's `bbr_update_ack_aggregation`).
    fn update_ack_aggregation(&mut self, now: Instant, acked: u64) {
        if acked == 0 || self.bw.get() == 0 {
            return;
        }
        if self.round_start
            && self.round_count.saturating_sub(self.extra_acked_slot_round) >= EXTRA_ACKED_WINDOW_ROUNDS
        {
            self.extra_acked_slot_round = self.round_count;
            self.extra_acked_slot = 1 - self.extra_acked_slot;
            self.extra_acked[self.extra_acked_slot] = 0;
        }
        let elapsed = (now - self.ack_epoch_start).total_micros();
        let mut expected = self.bw.get().saturating_mul(elapsed) / 1_000_000;
        if self.ack_epoch_acked <= expected || self.ack_epoch_acked + acked >= ACK_EPOCH_RESET {
            self.ack_epoch_acked = 0;
            self.ack_epoch_start = now;
            expected = 0;
        }
        self.ack_epoch_acked += acked;
        let extra = (self.ack_epoch_acked - expected).min(self.cwnd as u64);
        let slot = &mut self.extra_acked[self.extra_acked_slot];
        if extra > *slot {
            *slot = extra;
        }
    }

    fn aggregation_cwnd(&self) -> usize {
        let cap = self.bw.get() as u128 * EXTRA_ACKED_MAX.total_micros() as u128 / 1_000_000;
        (self.extra_acked[0].max(self.extra_acked[1]) as u128).min(cap) as usize
    }

    fn bdp(&self, gain: f64) -> usize {
        match self.min_rtt {
            Some(rtt) if self.bw.get() > 0 => {
                let bytes = self.bw.get() as f64 * rtt.total_micros() as f64 / 1e6;
                (bytes * gain) as usize
            }
            _ => INITIAL_CWND_SEGMENTS * self.mss,
        }
    }

    fn save_cwnd(&mut self) {
        if !self.in_recovery && self.mode != Mode::ProbeRtt {
            self.prior_cwnd = self.cwnd;
        } else {
            self.prior_cwnd = self.prior_cwnd.max(self.cwnd);
        }
    }

    fn restore_cwnd(&mut self) {
        self.cwnd = self.cwnd.max(self.prior_cwnd);
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        self.mode = Mode::ProbeBw;
        self.pacing_gain = 1.0;
        self.cwnd_gain = CWND_GAIN;
        // Start in a random-ish phase other than the draining one, as Linux does.
        self.cycle_index = (self.round_count as usize % 7 + 2) % CYCLE.len();
        self.cycle_stamp = now;
        self.pacing_gain = CYCLE[self.cycle_index];
    }

    fn update_cycle(&mut self, now: Instant, rs: &RateSample, prior_in_flight: usize) {
        if self.mode != Mode::ProbeBw {
            return;
        }
        let Some(min_rtt) = self.min_rtt else { return };
        let full_length = now - self.cycle_stamp > min_rtt;
        let gain = self.pacing_gain;
        let advance = if gain > 1.0 {
            full_length && (rs.lost > 0 || prior_in_flight >= self.bdp(gain))
        } else if gain < 1.0 {
            full_length || prior_in_flight <= self.bdp(1.0)
        } else {
            full_length
        };
        if advance {
            self.cycle_index = (self.cycle_index + 1) % CYCLE.len();
            self.cycle_stamp = now;
            self.pacing_gain = CYCLE[self.cycle_index];
        }
    }

    fn check_full_bw(&mut self, rs: &RateSample) {
        if self.filled_pipe || !self.round_start || rs.is_app_limited {
            return;
        }
        let bw = self.bw.get();
        if bw as f64 >= self.full_bw as f64 * FULL_BW_THRESH {
            self.full_bw = bw;
            self.full_bw_count = 0;
            return;
        }
        self.full_bw_count += 1;
        if self.full_bw_count >= FULL_BW_COUNT {
            self.filled_pipe = true;
        }
    }

    fn check_drain(&mut self, now: Instant, in_flight: usize) {
        if self.mode == Mode::Startup && self.filled_pipe {
            self.mode = Mode::Drain;
            self.pacing_gain = DRAIN_GAIN;
            self.cwnd_gain = HIGH_GAIN;
        }
        if self.mode == Mode::Drain && in_flight <= self.bdp(1.0) {
            self.enter_probe_bw(now);
        }
    }

    fn update_probe_rtt(&mut self, now: Instant, rs: &RateSample, in_flight: usize, expired: bool) {
        if self.mode != Mode::ProbeRtt && expired {
            self.mode = Mode::ProbeRtt;
            self.pacing_gain = 1.0;
            self.cwnd_gain = 1.0;
            self.save_cwnd();
            self.probe_rtt_done = None;
        }
        if self.mode != Mode::ProbeRtt {
            return;
        }
        match self.probe_rtt_done {
            None if in_flight <= MIN_CWND_SEGMENTS * self.mss => {
                self.probe_rtt_done = Some(now + PROBE_RTT_DURATION);
                self.probe_rtt_round_done = false;
                self.next_round_delivered = rs.delivered_total;
            }
            Some(done) => {
                if self.round_start {
                    self.probe_rtt_round_done = true;
                }
                if self.probe_rtt_round_done && now >= done {
                    self.min_rtt_stamp = now;
                    self.restore_cwnd();
                    if self.filled_pipe {
                        self.enter_probe_bw(now);
                    } else {
                        self.mode = Mode::Startup;
                        self.pacing_gain = HIGH_GAIN;
                        self.cwnd_gain = HIGH_GAIN;
                    }
                }
            }
            None => {}
        }
    }

    fn set_pacing_rate(&mut self) {
        let bw = self.bw.get();
        if bw == 0 {
            return;
        }
        let rate = (self.pacing_gain * bw as f64 * PACING_MARGIN) as u64;
        // In startup the rate only goes up: early samples are small.
        if self.filled_pipe || rate > self.pacing_rate {
            self.pacing_rate = rate;
        }
    }

    fn set_cwnd(&mut self, acked: usize, in_flight: usize) {
        if self.conservation {
            self.cwnd = self.cwnd.max(in_flight + acked);
        } else {
            let mut target = self.bdp(self.cwnd_gain) + 3 * self.mss;
            if self.filled_pipe {
                target += self.aggregation_cwnd();
            }
            if self.filled_pipe {
                self.cwnd = (self.cwnd + acked).min(target);
            } else if self.cwnd < target || self.round_count < 2 {
                self.cwnd += acked;
            }
        }
        if let Some(hi) = self.inflight_hi {
            self.cwnd = self.cwnd.min(hi);
        }
        self.cwnd = self.cwnd.max(MIN_CWND_SEGMENTS * self.mss);
        if self.mode == Mode::ProbeRtt {
            self.cwnd = self.cwnd.min(MIN_CWND_SEGMENTS * self.mss);
        }
    }
}

impl Controller for Bbr {
    fn window(&self) -> usize {
        self.cwnd
    }

    fn on_rate_sample(&mut self, now: Instant, rs: &RateSample, in_flight: usize) {
        self.now = now;
        let prior_in_flight = in_flight + rs.acked as usize;
        self.round_delivered += rs.acked;
        self.round_lost += rs.lost;
        if rs.prior_delivered >= self.next_round_delivered {
            self.next_round_delivered = rs.delivered_total;
            self.round_count += 1;
            self.round_start = true;
            self.update_loss_cap(prior_in_flight);
            self.conservation = false;
            if self.restore_after_round {
                self.restore_after_round = false;
                self.restore_cwnd();
            }
        } else {
            self.round_start = false;
        }
        if rs.interval > Duration::ZERO && rs.delivered > 0 {
            let bw = rs.delivered * 1_000_000 / rs.interval.total_micros().max(1);
            if !rs.is_app_limited || bw >= self.bw.get() {
                self.bw.update(BW_WINDOW_ROUNDS, self.round_count, bw);
            }
        }
        let expired = now > self.min_rtt_stamp + MIN_RTT_WINDOW;
        if let Some(rtt) = rs.rtt {
            self.srtt_hint = Some(rtt);
            if self.min_rtt.is_none_or(|m| rtt <= m) || expired {
                self.min_rtt = Some(rtt);
                self.min_rtt_stamp = now;
            }
        }
        self.update_ack_aggregation(now, rs.acked);
        self.check_full_bw(rs);
        self.check_drain(now, in_flight);
        self.update_cycle(now, rs, prior_in_flight);
        self.update_probe_rtt(now, rs, in_flight, expired && rs.rtt.is_some());
        self.set_pacing_rate();
        self.set_cwnd(rs.acked as usize, in_flight);
    }

    fn pacing_rate(&self) -> Option<u64> {
        if self.pacing_rate > 0 {
            return Some(self.pacing_rate);
        }
        // Before the first sample: the initial window over the first RTT estimate, at high gain.
        let rtt = self.srtt_hint.unwrap_or(Duration::from_millis(1)).total_micros().max(1);
        Some((HIGH_GAIN * self.cwnd as f64 * 1e6 / rtt as f64) as u64)
    }

    fn model(&self) -> Option<(u64, Duration)> {
        Some((self.bw.get(), self.min_rtt.unwrap_or(Duration::ZERO)))
    }

    fn on_loss(&mut self, now: Instant, in_flight: usize) {
        // A recovery episode starts: conserve packets for a round (a new round starts now).
        self.now = now;
        self.save_cwnd();
        self.in_recovery = true;
        self.conservation = true;
        self.cwnd = self.cwnd.min(in_flight.max(MIN_CWND_SEGMENTS * self.mss));
    }

    fn on_recovery_exit(&mut self, _now: Instant) {
        self.in_recovery = false;
        self.conservation = false;
        self.restore_cwnd();
    }

    fn on_rto(&mut self, _now: Instant, _in_flight: usize) {
        self.save_cwnd();
        self.cwnd = self.mss;
        self.full_bw = 0;
        self.restore_after_round = true;
    }

    fn on_ack(&mut self, _now: Instant, _len: usize, _in_flight: usize, rtt: &RttEstimator) {
        let _ = rtt;
    }

    fn set_mss(&mut self, mss: usize) {
        if self.cwnd == INITIAL_CWND_SEGMENTS * self.mss {
            self.cwnd = INITIAL_CWND_SEGMENTS * mss;
        }
        self.mss = mss;
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const MSS: usize = 1000;

    fn sample(delivered: u64, interval_ms: u64, total: u64, prior: u64, rtt_ms: u64) -> RateSample {
        RateSample {
            delivered,
            interval: Duration::from_millis(interval_ms),
            delivered_total: total,
            prior_delivered: prior,
            is_app_limited: false,
            rtt: Some(Duration::from_millis(rtt_ms)),
            acked: delivered.min(2 * MSS as u64),
            lost: 0,
        }
    }

    /// One round trip of 10 ms at `rate` bytes/s, delivered in two samples.
    fn round(b: &mut Bbr, t: &mut i64, total: &mut u64, rate: u64, in_flight: usize) {
        let per_round = rate / 100;
        for _ in 0..2 {
            let prior = *total;
            *total += per_round / 2;
            *t += 5;
            let mut rs = sample(per_round, 10, *total, prior, 10);
            rs.acked = per_round / 2;
            b.on_rate_sample(Instant::from_millis(*t), &rs, in_flight);
        }
    }

    #[test]
    fn startup_finds_the_bottleneck_and_probe_bw_paces_at_it() {
        let mut b = Bbr::new();
        b.set_mss(MSS);
        let (mut t, mut total) = (0, 0);
        // A 10 MB/s bottleneck: startup's samples stop growing, BBR drains and cruises.
        for _ in 0..20 {
            round(&mut b, &mut t, &mut total, 10_000_000, 50_000);
        }
        assert!(b.filled_pipe);
        assert_eq!(b.mode, Mode::ProbeBw);
        let rate = b.pacing_rate().unwrap();
        assert!(rate > 7_000_000 && rate < 13_000_000, "paced near the bottleneck: {rate}");
        let bdp = 10_000_000 / 100;
        assert!(b.window() >= bdp && b.window() <= 3 * bdp, "cwnd about 2 BDP: {}", b.window());
    }

    #[test]
    fn random_loss_does_not_shrink_the_model() {
        let mut b = Bbr::new();
        b.set_mss(MSS);
        let (mut t, mut total) = (0, 0);
        for _ in 0..20 {
            round(&mut b, &mut t, &mut total, 10_000_000, 50_000);
        }
        let before = b.pacing_rate().unwrap();
        // A loss episode per round for ten rounds.
        for _ in 0..10 {
            b.on_loss(Instant::from_millis(t), 150_000);
            round(&mut b, &mut t, &mut total, 10_000_000, 150_000);
            b.on_recovery_exit(Instant::from_millis(t));
        }
        let after = b.pacing_rate().unwrap();
        assert!(after as f64 > before as f64 * 0.7, "rate kept: {before} -> {after}");
        assert!(b.window() >= 100_000, "window kept: {}", b.window());
    }

    #[test]
    fn max_filter_forgets_old_samples() {
        let mut f = MaxFilter::default();
        f.update(10, 1, 100);
        f.update(10, 2, 50);
        assert_eq!(f.get(), 100);
        for t in 3..20 {
            f.update(10, t, 50);
        }
        assert_eq!(f.get(), 50, "the old maximum left the window");
    }
}
