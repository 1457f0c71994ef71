//! Sender-side loss recovery: a log of the segments in flight with a SACK scoreboard, RACK-TLP
//! loss detection (RFC 8985) and the "pipe" estimate of RFC 6675.
//!
//! Not part of upstream smoltcp 0.14.0: added by the `socket-tcp-rack` feature (see PATCHES.md at
//! the crate root). Upstream retransmits once on the third duplicate ACK and otherwise waits for the
//! retransmission timer, so a second loss in one window, a lost retransmission or a lost tail costs
//! a full RTO and a collapse to one segment. Here:
//!
//! - every transmission of data is logged (sequence range, time sent, SACKed / lost / retransmitted);
//! - SACK blocks and cumulative ACKs mark segments delivered; the most recently *sent* delivered
//!   segment sets the RACK reference: any segment sent before it and still undelivered one RTT plus a
//!   reordering window later is lost, whether it is an original or a retransmission;
//! - a tail loss probe (one segment, about two RTTs after the last ACK) turns a lost tail into SACK
//!   information instead of a timeout;
//! - what is in flight is the pipe (sent - SACKed - marked lost), so the congestion window paces
//!   retransmissions and new data alike during recovery;
//! - a recovery episode lasts until everything outstanding at its start is acknowledged, and the
//!   congestion controller hears of it once.
//!
//! Peers without SACK fall back to NewReno: the third duplicate ACK marks the first segment lost,
//! and each partial ACK during recovery marks the next one.
//!
//! Memory: one 24-byte record per segment in flight (plus one per transmission in the time-ordered
//! queue), bounded by the transmit buffer divided by the MSS.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use crate::time::{Duration, Instant};
use crate::wire::TcpSeqNumber;

const SACKED: u8 = 1;
const LOST: u8 = 2;
const RETRANS: u8 = 4;

/// A TLP waits at least this long (RFC 8985 leaves the floor to the implementation; the event loop
/// that drives a socket may run late by about this much).
const PTO_MIN: Duration = Duration::from_millis(5);
/// Added to the probe timeout when one segment is in flight: the receiver may delay its ACK.
const PTO_DELAYED_ACK: Duration = Duration::from_millis(50);
/// The minimum RTT is remembered for this long before a fresh sample replaces it (paths change).
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);

/// Counters of what loss recovery did, for diagnostics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RecoveryStats {
    /// Segments sent again (after a loss was detected, as a probe, or after a timeout).
    pub retransmitted_segments: u64,
    /// Segments RACK or NewReno declared lost.
    pub lost_segments: u64,
    /// Recovery episodes entered (each one reduces the congestion window once).
    pub recoveries: u64,
    /// Tail loss probes sent.
    pub tail_loss_probes: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
}

#[derive(Debug, Clone, Copy)]
struct Seg {
    start: u32,
    len: u32,
    xmit: Instant,
    flags: u8,
    /// Delivery-rate state when it was sent (draft-cheng-iccrg-delivery-rate-estimation).
    rate: SentRate,
}

/// What the connection had delivered when a segment was sent.
#[derive(Debug, Clone, Copy)]
struct SentRate {
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
    app_limited: bool,
}

impl Seg {
    fn end(&self) -> u32 {
        self.start.wrapping_add(self.len)
    }
}

/// `a` comes before `b` in sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[derive(Debug, Clone, Copy)]
struct Rack {
    /// Send time and end of the most recently sent segment known delivered.
    xmit: Instant,
    end: u32,
    /// Its round-trip time.
    rtt: Duration,
}

/// A delivery-rate sample: how much was delivered over how long, taken on one ACK
/// (draft-cheng-iccrg-delivery-rate-estimation). Model-based congestion control (BBR) runs on it.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateSample {
    /// Bytes delivered over `interval`.
    pub delivered: u64,
    /// The interval; zero when the sample is not usable (shorter than the minimum RTT).
    pub interval: Duration,
    /// The connection's total delivered bytes after this ACK.
    pub delivered_total: u64,
    /// The total when the most recently sent segment this ACK delivered was sent.
    pub prior_delivered: u64,
    /// The sender had nothing to send when that segment left: the rate is a lower bound.
    pub is_app_limited: bool,
    /// A round-trip time measured on this ACK (segments sent once).
    pub rtt: Option<Duration>,
    /// Bytes this ACK newly acknowledged or SACKed.
    pub acked: u64,
    /// Bytes newly marked lost while processing this ACK.
    pub lost: u64,
}

/// What an ACK changed.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct AckOutcome {
    /// A recovery episode started: reduce the congestion window.
    pub entered_recovery: bool,
    /// The recovery episode ended: everything outstanding at its start is acknowledged.
    pub exited_recovery: bool,
    /// A round-trip time measured on a segment sent once (Karn's rule).
    pub rtt_sample: Option<Duration>,
    /// The delivery-rate sample, when the ACK delivered anything.
    pub rate: Option<RateSample>,
}

/// The sample being built while one ACK is processed.
#[derive(Debug, Default, Clone, Copy)]
struct RateBuild {
    acked: u64,
    prior_delivered: Option<u64>,
    prior_time: Option<Instant>,
    send_elapsed: Duration,
    ack_elapsed: Duration,
    is_app_limited: bool,
}

/// Loss recovery state of one socket. See the module documentation.
#[derive(Debug)]
pub(super) struct Recovery {
    /// Segments sent and not cumulatively acknowledged, in sequence order, contiguous.
    segs: VecDeque<Seg>,
    /// Every transmission (start, time), in the order sent; stale entries are skipped lazily.
    sent_order: VecDeque<(u32, Instant)>,
    /// Starts of segments marked lost and not yet sent again, in the order marked.
    lost_queue: VecDeque<u32>,
    /// SACKed ranges above the cumulative ACK: sorted, disjoint, merged.
    sacked_ranges: Vec<(u32, u32)>,
    sacked_bytes: usize,
    sacked_segs: usize,
    lost_bytes: usize,
    rack: Option<Rack>,
    min_rtt: Option<(Duration, Instant)>,
    srtt: Option<Duration>,
    reordering_seen: bool,
    /// Highest end of a delivered segment (RACK.fack).
    fack: Option<u32>,
    /// After a timeout: data below this was sent before, whatever the log says.
    resent_below: Option<u32>,
    /// Highest sequence sent when the current recovery episode began.
    recovery_point: Option<u32>,
    reorder_at: Option<Instant>,
    tlp_at: Option<Instant>,
    tlp_pending: bool,
    /// End of what was outstanding when the last probe went out; no new probe until it is acked.
    tlp_end: Option<u32>,
    stats: RecoveryStats,
    /// Delivery-rate state of the connection: bytes delivered so far, when the last delivery was
    /// seen, when the segment behind the latest sample was sent, and (non-zero) the delivered
    /// count until which the sender is application-limited.
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
    app_limited_until: u64,
    build: RateBuild,
}

impl Recovery {
    pub fn new() -> Recovery {
        Recovery {
            segs: VecDeque::new(),
            sent_order: VecDeque::new(),
            lost_queue: VecDeque::new(),
            sacked_ranges: Vec::new(),
            sacked_bytes: 0,
            sacked_segs: 0,
            lost_bytes: 0,
            rack: None,
            min_rtt: None,
            srtt: None,
            reordering_seen: false,
            fack: None,
            resent_below: None,
            recovery_point: None,
            reorder_at: None,
            tlp_at: None,
            tlp_pending: false,
            tlp_end: None,
            stats: RecoveryStats::default(),
            delivered: 0,
            delivered_time: Instant::ZERO,
            first_sent_time: Instant::ZERO,
            app_limited_until: 0,
            build: RateBuild::default(),
        }
    }

    fn sent_rate(&mut self, now: Instant) -> SentRate {
        if self.segs.is_empty() {
            // Nothing in flight: a new flight starts here.
            self.first_sent_time = now;
            self.delivered_time = now;
        }
        SentRate {
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent_time: self.first_sent_time,
            app_limited: self.app_limited_until != 0,
        }
    }

    /// The sender has nothing more to send while the congestion window has room: rate samples
    /// taken until what is in flight now is delivered only show what the application offered.
    pub fn on_app_limited(&mut self, pipe: usize) {
        self.app_limited_until = (self.delivered + pipe as u64).max(1);
    }

    pub fn stats(&self) -> RecoveryStats {
        self.stats
    }

    pub fn in_recovery(&self) -> bool {
        self.recovery_point.is_some()
    }

    /// Bytes in flight per RFC 6675: sent and not acknowledged, less what the receiver holds
    /// (SACKed) and what left the network (marked lost, not yet sent again).
    pub fn pipe(&self, flight_size: usize) -> usize {
        flight_size.saturating_sub(self.sacked_bytes + self.lost_bytes)
    }

    fn index_of(&self, start: u32) -> Option<usize> {
        let base = self.segs.front()?.start;
        let off = start.wrapping_sub(base);
        if (off as i32) < 0 {
            return None;
        }
        self.segs
            .binary_search_by(|s| s.start.wrapping_sub(base).cmp(&off))
            .ok()
    }

    /// Index of the first segment that ends after `seq`.
    fn index_after(&self, seq: u32) -> usize {
        let Some(base) = self.segs.front().map(|s| s.start) else {
            return 0;
        };
        let off = seq.wrapping_sub(base);
        if (off as i32) < 0 {
            return 0;
        }
        self.segs
            .partition_point(|s| s.end().wrapping_sub(base) <= off)
    }

    /// A segment of `len` sequence numbers (data plus FIN) starting at `start` was sent.
    pub fn on_transmit(&mut self, start: TcpSeqNumber, len: usize, now: Instant) {
        let start = start.0 as u32;
        let len = len as u32;
        if len == 0 {
            return;
        }
        let end = self.segs.back().map(|s| s.end());
        match end {
            Some(end) if before(start, end) => {
                let Some(i) = self.index_of(start).or_else(|| {
                    let i = self.index_after(start);
                    (i < self.segs.len()).then_some(i)
                }) else {
                    return;
                };
                let seg = self.segs[i];
                if seg.start == start && len < seg.len {
                    // Sent again in a smaller piece (options took room): the rest keeps its state.
                    let rest = Seg {
                        start: start.wrapping_add(len),
                        len: seg.len - len,
                        ..seg
                    };
                    self.segs[i].len = len;
                    self.segs.insert(i + 1, rest);
                    if seg.flags & LOST != 0 {
                        self.lost_bytes -= len as usize;
                        self.lost_queue.push_front(rest.start);
                        self.segs[i].flags &= !LOST;
                    }
                    // Sent when the whole was: older than anything queued.
                    self.sent_order.push_front((rest.start, rest.xmit));
                }
                let rate = self.sent_rate(now);
                let seg = &mut self.segs[i];
                if seg.flags & LOST != 0 {
                    seg.flags &= !LOST;
                    self.lost_bytes -= seg.len as usize;
                }
                seg.flags |= RETRANS;
                seg.xmit = now;
                seg.rate = rate;
                self.sent_order.push_back((seg.start, now));
                self.stats.retransmitted_segments += 1;
                self.prune_lost();
            }
            Some(end) if end != start => {
                // Not contiguous with what was logged: the socket rewound without telling us.
                // Forget the log rather than act on a wrong one.
                self.forget();
                self.push(start, len, now);
            }
            _ => self.push(start, len, now),
        }
    }

    fn push(&mut self, start: u32, len: u32, now: Instant) {
        let rate = self.sent_rate(now);
        let flags = match self.resent_below {
            Some(high) if before(start, high) => RETRANS,
            Some(_) => {
                self.resent_below = None;
                0
            }
            None => 0,
        };
        if flags != 0 {
            self.stats.retransmitted_segments += 1;
        }
        self.segs.push_back(Seg {
            start,
            len,
            xmit: now,
            flags,
            rate,
        });
        self.sent_order.push_back((start, now));
    }

    /// A TLP went out: no other until what was outstanding then is acknowledged.
    pub fn on_probe_sent(&mut self, snd_nxt: TcpSeqNumber) {
        self.tlp_pending = false;
        self.tlp_end = Some(snd_nxt.0 as u32);
        self.stats.tail_loss_probes += 1;
    }

    /// The retransmission timer fired: the socket resends everything from the cumulative ACK, so
    /// the log starts over (the RTT estimates stay). What goes out again below `snd_nxt` is logged
    /// as retransmitted: an ACK already on its way for the first copy must not pass for a sample.
    pub fn on_rto(&mut self, snd_nxt: TcpSeqNumber) {
        self.stats.timeouts += 1;
        self.forget();
        self.resent_below = Some(snd_nxt.0 as u32);
    }

    fn forget(&mut self) {
        self.segs.clear();
        self.sent_order.clear();
        self.lost_queue.clear();
        self.sacked_ranges.clear();
        self.sacked_bytes = 0;
        self.sacked_segs = 0;
        self.lost_bytes = 0;
        self.rack = None;
        self.fack = None;
        self.recovery_point = None;
        self.reorder_at = None;
        self.tlp_at = None;
        self.tlp_pending = false;
        self.tlp_end = None;
    }

    /// An acceptable ACK arrived: `ack` is the new cumulative acknowledgement, `sacks` the blocks it
    /// carried (already empty when the peer did not negotiate SACK), `snd_nxt` the highest sequence
    /// sent.
    pub fn on_ack(
        &mut self,
        ack: TcpSeqNumber,
        sacks: &[Option<(u32, u32)>],
        snd_nxt: TcpSeqNumber,
        has_sack: bool,
        now: Instant,
    ) -> AckOutcome {
        let ack = ack.0 as u32;
        let snd_nxt = snd_nxt.0 as u32;
        let mut out = AckOutcome::default();
        self.build = RateBuild::default();
        let old_una = self.segs.front().map(|s| s.start);

        // Cumulatively acknowledged segments.
        while let Some(&seg) = self.segs.front() {
            if !before(ack, seg.end()) {
                self.segs.pop_front();
                if seg.flags & SACKED != 0 {
                    self.sacked_bytes -= seg.len as usize;
                    self.sacked_segs -= 1;
                } else {
                    self.delivered(&seg, now, &mut out);
                }
                if seg.flags & LOST != 0 {
                    self.lost_bytes -= seg.len as usize;
                }
            } else if before(seg.start, ack) {
                // Acknowledged up to the middle of a segment: keep the rest as its own segment.
                let cut = ack.wrapping_sub(seg.start);
                let front = &mut self.segs[0];
                front.start = ack;
                front.len -= cut;
                if front.flags & LOST != 0 {
                    self.lost_bytes -= cut as usize;
                    self.lost_queue.push_front(ack);
                }
                if front.flags & SACKED != 0 {
                    self.sacked_bytes -= cut as usize;
                }
                let xmit = front.xmit;
                self.sent_order.push_front((ack, xmit));
                break;
            } else {
                break;
            }
        }
        self.sacked_ranges.retain_mut(|r| {
            if !before(ack, r.1) {
                return false;
            }
            if before(r.0, ack) {
                r.0 = ack;
            }
            true
        });
        let advanced = old_una.is_some_and(|u| before(u, ack));

        // Selectively acknowledged segments, lowest first (the order of the blocks says nothing
        // about the order of arrival); only what the known ranges do not cover yet is walked.
        if has_sack {
            let mut blocks: [Option<(u32, u32)>; 4] = [None; 4];
            let mut n = 0;
            for &(left, right) in sacks.iter().flatten() {
                let valid = !before(left, ack) && before(left, right) && !before(snd_nxt, right);
                if valid && n < blocks.len() {
                    blocks[n] = Some((left, right));
                    n += 1;
                }
            }
            let blocks = &mut blocks[..n];
            blocks.sort_unstable_by_key(|b| b.map(|(left, _)| left.wrapping_sub(ack)));
            for &(left, right) in blocks.iter().flatten() {
                self.sack(left, right, now, &mut out);
            }
        }

        if let Some(point) = self.recovery_point {
            if !before(ack, point) {
                self.recovery_point = None;
                out.exited_recovery = true;
            } else if advanced && !has_sack {
                // NewReno: a partial ACK means the next segment was lost too.
                self.mark_front_lost();
            }
        }
        if self.tlp_end.is_some_and(|e| !before(ack, e)) {
            self.tlp_end = None;
        }
        let lost_before = self.lost_bytes;
        self.detect_loss(now);
        self.prune_lost();
        if self.lost_bytes > lost_before || (self.lost_bytes > 0 && self.recovery_point.is_none()) {
            out.entered_recovery |= self.enter_recovery(snd_nxt);
        }
        if self.app_limited_until != 0 && self.delivered > self.app_limited_until {
            self.app_limited_until = 0;
        }
        if let Some(prior_delivered) = self.build.prior_delivered {
            let b = self.build;
            let mut interval = if b.send_elapsed > b.ack_elapsed { b.send_elapsed } else { b.ack_elapsed };
            if self.min_rtt.is_some_and(|(min, _)| interval < min) {
                // Shorter than a round trip: ACK compression, not a rate.
                interval = Duration::ZERO;
            }
            out.rate = Some(RateSample {
                delivered: self.delivered - prior_delivered,
                interval,
                delivered_total: self.delivered,
                prior_delivered,
                is_app_limited: b.is_app_limited,
                rtt: out.rtt_sample,
                acked: b.acked,
                lost: self.lost_bytes.saturating_sub(lost_before) as u64,
            });
        }
        out
    }

    /// Without SACK, the third duplicate ACK marks the first unacknowledged segment lost.
    /// Returns whether a recovery episode started.
    pub fn on_duplicate_acks(&mut self, count: u8, snd_nxt: TcpSeqNumber) -> bool {
        if count != 3 || self.recovery_point.is_some() {
            return false;
        }
        self.mark_front_lost();
        self.enter_recovery(snd_nxt.0 as u32)
    }

    fn enter_recovery(&mut self, snd_nxt: u32) -> bool {
        if self.recovery_point.is_some() || self.lost_bytes == 0 {
            return false;
        }
        self.recovery_point = Some(snd_nxt);
        self.tlp_at = None;
        self.stats.recoveries += 1;
        true
    }

    fn mark_front_lost(&mut self) {
        if let Some(seg) = self.segs.front()
            && seg.flags & (SACKED | LOST) == 0
        {
            self.mark_lost(0);
        }
    }

    fn mark_lost(&mut self, i: usize) {
        let seg = &mut self.segs[i];
        seg.flags |= LOST;
        self.lost_bytes += seg.len as usize;
        self.lost_queue.push_back(seg.start);
        self.stats.lost_segments += 1;
    }

    fn sack(&mut self, left: u32, right: u32, now: Instant, out: &mut AckOutcome) {
        // Walk the parts of [left, right) not already known SACKed.
        let mut cursor = left;
        let known: Vec<(u32, u32)> = self
            .sacked_ranges
            .iter()
            .copied()
            .filter(|r| before(r.0, right) && before(left, r.1))
            .collect();
        for (l, r) in known {
            if before(cursor, l) {
                self.mark_sacked(cursor, l, now, out);
            }
            if before(cursor, r) {
                cursor = r;
            }
        }
        if before(cursor, right) {
            self.mark_sacked(cursor, right, now, out);
        }
        self.merge_range(left, right);
    }

    fn mark_sacked(&mut self, left: u32, right: u32, now: Instant, out: &mut AckOutcome) {
        let mut i = self.index_after(left);
        while i < self.segs.len() {
            let seg = self.segs[i];
            if before(right, seg.end()) {
                break;
            }
            if !before(seg.start, left) && seg.flags & SACKED == 0 {
                self.segs[i].flags |= SACKED;
                self.sacked_bytes += seg.len as usize;
                self.sacked_segs += 1;
                if seg.flags & LOST != 0 {
                    self.segs[i].flags &= !LOST;
                    self.lost_bytes -= seg.len as usize;
                }
                self.delivered(&seg, now, out);
            }
            i += 1;
        }
    }

    fn merge_range(&mut self, left: u32, right: u32) {
        let (mut l, mut r) = (left, right);
        self.sacked_ranges.retain(|&(a, b)| {
            // Overlapping or touching ranges are merged into (l, r).
            if before(b, l) || before(r, a) {
                true
            } else {
                if before(a, l) {
                    l = a;
                }
                if before(r, b) {
                    r = b;
                }
                false
            }
        });
        let at = self.sacked_ranges.partition_point(|&(a, _)| before(a, l));
        self.sacked_ranges.insert(at, (l, r));
    }

    /// A segment reached the receiver (RFC 8985 6.2, steps 1-3; and the delivery rate).
    fn delivered(&mut self, seg: &Seg, now: Instant, out: &mut AckOutcome) {
        self.delivered += seg.len as u64;
        self.delivered_time = now;
        self.build.acked += seg.len as u64;
        if self.build.prior_delivered.is_none_or(|p| seg.rate.delivered >= p) {
            self.build.prior_delivered = Some(seg.rate.delivered);
            self.build.prior_time = Some(seg.rate.delivered_time);
            self.build.is_app_limited = seg.rate.app_limited;
            self.build.send_elapsed = seg.xmit - seg.rate.first_sent_time;
            self.build.ack_elapsed = now - seg.rate.delivered_time;
            self.first_sent_time = seg.xmit;
        }
        let rtt = now - seg.xmit;
        let retransmitted = seg.flags & RETRANS != 0;
        if retransmitted {
            // An ACK sooner than the minimum RTT after a retransmission was for the original: it
            // was late, not lost, so the path reorders (a receiver's DSACK would say the same).
            if self.min_rtt.is_none_or(|(min, _)| rtt < min) {
                self.reordering_seen = true;
                return;
            }
        } else {
            out.rtt_sample = Some(rtt);
            self.srtt = Some(match self.srtt {
                None => rtt,
                Some(s) => (s * 7 + rtt) / 8,
            });
            let fresh = match self.min_rtt {
                None => true,
                Some((min, at)) => rtt <= min || now - at > MIN_RTT_WINDOW,
            };
            if fresh {
                self.min_rtt = Some((rtt, now));
            }
        }
        match self.fack {
            // Below what was already delivered, and sent only once: the path reorders
            // (RFC 8985 6.2, step 3).
            Some(fack) if before(seg.end(), fack) => self.reordering_seen |= !retransmitted,
            _ => self.fack = Some(seg.end()),
        }
        if let Some(rack) = self.rack {
            let newer =
                seg.xmit > rack.xmit || (seg.xmit == rack.xmit && before(rack.end, seg.end()));
            if !newer {
                return;
            }
        }
        self.rack = Some(Rack {
            xmit: seg.xmit,
            end: seg.end(),
            rtt,
        });
    }

    /// RACK.reo_wnd (RFC 8985 6.2, step 4).
    fn reo_wnd(&self) -> Duration {
        if !self.reordering_seen && (self.recovery_point.is_some() || self.sacked_segs >= 3) {
            return Duration::ZERO;
        }
        let Some((min, _)) = self.min_rtt else {
            return Duration::ZERO;
        };
        let quarter = min / 4;
        match self.srtt {
            Some(s) if s < quarter => s,
            _ => quarter,
        }
    }

    /// Marks lost every segment sent before the RACK reference and undelivered one RTT plus the
    /// reordering window after it was sent; arms the reordering timer for the first one not due yet.
    fn detect_loss(&mut self, now: Instant) {
        self.reorder_at = None;
        let Some(rack) = self.rack else {
            return;
        };
        let reo = self.reo_wnd();
        while let Some(&(start, xmit)) = self.sent_order.front() {
            let Some(i) = self.index_of(start) else {
                self.sent_order.pop_front();
                continue;
            };
            let seg = self.segs[i];
            if seg.xmit != xmit || seg.flags & (SACKED | LOST) != 0 {
                self.sent_order.pop_front();
                continue;
            }
            let sent_before =
                xmit < rack.xmit || (xmit == rack.xmit && before(seg.end(), rack.end));
            if !sent_before {
                break;
            }
            let due = xmit + rack.rtt + reo;
            if due > now {
                self.reorder_at = Some(due);
                break;
            }
            self.mark_lost(i);
            self.sent_order.pop_front();
        }
    }

    /// The next segment to send again, as (start, length), if any is marked lost.
    pub fn next_lost(&self) -> Option<(u32, u32)> {
        self.lost_queue.iter().find_map(|&start| {
            let i = self.index_of(start)?;
            (self.segs[i].flags & LOST != 0).then(|| (start, self.segs[i].len))
        })
    }

    /// Drops entries at the head of the lost queue that were sent again, delivered or acked, so
    /// [`Self::next_lost`] finds the next one at once.
    fn prune_lost(&mut self) {
        while let Some(&start) = self.lost_queue.front() {
            match self.index_of(start) {
                Some(i) if self.segs[i].flags & LOST != 0 => break,
                _ => {
                    self.lost_queue.pop_front();
                }
            }
        }
    }

    /// A probe is due: send one segment whatever the congestion window says.
    pub fn probe_pending(&self) -> bool {
        self.tlp_pending
    }

    /// The segment a probe sends again when there is no new data: the last one not SACKed.
    pub fn probe_segment(&self) -> Option<(u32, u32)> {
        self.segs
            .iter()
            .rev()
            .find(|s| s.flags & SACKED == 0)
            .map(|s| (s.start, s.len))
    }

    /// Starts or restarts the probe timer after new data went out or new data was acknowledged
    /// (RFC 8985 7.2). `rto_at` caps it: a probe never comes later than the timeout.
    pub fn arm_probe(
        &mut self,
        now: Instant,
        flight_size: usize,
        mss: usize,
        has_sack: bool,
        rto_at: Option<Instant>,
    ) {
        self.tlp_at = None;
        if !has_sack
            || flight_size == 0
            || self.recovery_point.is_some()
            || self.lost_bytes > 0
            || self.tlp_end.is_some()
        {
            return;
        }
        let Some(srtt) = self.srtt else {
            return;
        };
        let mut pto = srtt * 2;
        if flight_size <= mss {
            pto += PTO_DELAYED_ACK;
        }
        if pto < PTO_MIN {
            pto = PTO_MIN;
        }
        let mut at = now + pto;
        if let Some(rto) = rto_at
            && rto < at
        {
            at = rto;
        }
        self.tlp_at = Some(at);
    }

    /// Fires the reordering and probe timers that are due. Returns whether a recovery episode
    /// started (segments were found lost).
    pub fn on_timers(&mut self, now: Instant, snd_nxt: TcpSeqNumber) -> bool {
        let mut entered = false;
        if self.reorder_at.is_some_and(|t| t <= now) {
            self.detect_loss(now);
            entered = self.enter_recovery(snd_nxt.0 as u32);
        }
        if self.tlp_at.is_some_and(|t| t <= now) {
            self.tlp_at = None;
            if self.recovery_point.is_none() && !self.segs.is_empty() {
                self.tlp_pending = true;
            }
        }
        entered
    }

    /// When the socket must be polled for these timers.
    pub fn poll_at(&self) -> Option<Instant> {
        if self.tlp_pending {
            return Some(Instant::from_micros(0));
        }
        match (self.reorder_at, self.tlp_at) {
            (Some(a), Some(b)) => Some(if a < b { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const MSS: u32 = 1000;

    fn t(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    fn seq(n: u32) -> TcpSeqNumber {
        TcpSeqNumber(n as i32)
    }

    /// Sends `count` full segments from `from` at time `at`.
    fn send(r: &mut Recovery, from: u32, count: u32, at: Instant) {
        for i in 0..count {
            r.on_transmit(seq(from.wrapping_add(i * MSS)), MSS as usize, at);
        }
    }

    #[test]
    fn sack_above_a_hole_marks_it_lost_once_an_rtt_has_passed() {
        let mut r = Recovery::new();
        send(&mut r, 0, 10, t(0));
        // Segment 0 lost; 1..4 arrive and are SACKed 10 ms later.
        let out = r.on_ack(seq(0), &[Some((1000, 5000)), None, None], seq(10_000), true, t(10));
        assert!(out.entered_recovery, "four segments SACKed above a hole");
        assert_eq!(r.next_lost(), Some((0, MSS)));
        assert_eq!(r.pipe(10_000), 10_000 - 4000 - 1000);
        // The retransmission goes out; the hole is no longer counted as lost.
        r.on_transmit(seq(0), MSS as usize, t(11));
        assert_eq!(r.next_lost(), None);
        assert_eq!(r.pipe(10_000), 10_000 - 4000);
        // The cumulative ACK covering everything ends the episode.
        let out = r.on_ack(seq(10_000), &[None, None, None], seq(10_000), true, t(21));
        assert!(out.exited_recovery);
        assert!(!r.in_recovery());
        assert_eq!(r.pipe(0), 0);
        assert_eq!(r.stats().recoveries, 1);
    }

    #[test]
    fn a_lost_retransmission_is_found_without_a_timeout() {
        let mut r = Recovery::new();
        send(&mut r, 0, 10, t(0));
        r.on_ack(seq(0), &[Some((1000, 5000)), None, None], seq(10_000), true, t(10));
        r.on_transmit(seq(0), MSS as usize, t(11));
        // New data sent after the retransmission arrives; the retransmission does not.
        send(&mut r, 10_000, 2, t(12));
        let out = r.on_ack(seq(0), &[Some((1000, 12_000)), None, None], seq(12_000), true, t(22));
        assert!(!out.entered_recovery, "still the same episode");
        assert_eq!(r.next_lost(), Some((0, MSS)), "sent before a delivered segment, an RTT ago");
        assert_eq!(r.stats().lost_segments, 2);
    }

    #[test]
    fn several_holes_in_one_window_are_one_episode() {
        let mut r = Recovery::new();
        send(&mut r, 0, 20, t(0));
        let sacks = [Some((15_000, 20_000)), Some((8_000, 12_000)), Some((1000, 5000))];
        let out = r.on_ack(seq(0), &sacks, seq(20_000), true, t(10));
        assert!(out.entered_recovery);
        let mut lost = vec![];
        while let Some((s, l)) = r.next_lost() {
            lost.push(s);
            r.on_transmit(seq(s), l as usize, t(11));
        }
        assert_eq!(lost, vec![0, 5000, 6000, 7000, 12_000, 13_000, 14_000]);
        // Partial ACK: the episode goes on without a second reduction.
        let out = r.on_ack(seq(5000), &[Some((8_000, 12_000)), None, None], seq(20_000), true, t(20));
        assert!(!out.entered_recovery && !out.exited_recovery);
        assert_eq!(r.stats().recoveries, 1);
    }

    #[test]
    fn reordering_within_the_window_is_not_loss() {
        let mut r = Recovery::new();
        // Establish an RTT of 10 ms.
        send(&mut r, 0, 1, t(0));
        r.on_ack(seq(1000), &[None, None, None], seq(1000), true, t(10));
        // Segment at 1000 sent at 20 ms, 2000 at 21 ms; 2000 arrives first.
        r.on_transmit(seq(1000), MSS as usize, t(20));
        r.on_transmit(seq(2000), MSS as usize, t(21));
        let out = r.on_ack(seq(1000), &[Some((2000, 3000)), None, None], seq(3000), true, t(31));
        assert!(!out.entered_recovery, "1 ms apart, the reordering window is 2.5 ms");
        assert!(r.poll_at().is_some(), "the reordering timer is armed");
        // It arrives before the timer fires.
        let out = r.on_ack(seq(3000), &[None, None, None], seq(3000), true, t(31));
        assert!(!out.entered_recovery);
        assert_eq!(r.stats().lost_segments, 0);
        assert!(r.reordering_seen);
    }

    #[test]
    fn the_reordering_timer_marks_the_hole_when_nothing_else_arrives() {
        let mut r = Recovery::new();
        send(&mut r, 0, 1, t(0));
        r.on_ack(seq(1000), &[None, None, None], seq(1000), true, t(10));
        r.on_transmit(seq(1000), MSS as usize, t(20));
        r.on_transmit(seq(2000), MSS as usize, t(21));
        r.on_ack(seq(1000), &[Some((2000, 3000)), None, None], seq(3000), true, t(31));
        let at = r.poll_at().unwrap();
        assert!(!r.on_timers(at - Duration::from_micros(1), seq(3000)));
        assert!(r.on_timers(at, seq(3000)), "due: lost, recovery starts");
        assert_eq!(r.next_lost(), Some((1000, MSS)));
    }

    #[test]
    fn a_tail_probe_is_armed_and_fires() {
        let mut r = Recovery::new();
        send(&mut r, 0, 1, t(0));
        r.on_ack(seq(1000), &[None, None, None], seq(1000), true, t(10));
        send(&mut r, 1000, 3, t(20));
        r.arm_probe(t(20), 3000, MSS as usize, true, Some(t(220)));
        let at = r.poll_at().unwrap();
        assert_eq!(at, t(40), "two RTTs");
        r.on_timers(at, seq(4000));
        assert!(r.probe_pending());
        assert_eq!(r.probe_segment(), Some((3000, MSS)));
        r.on_transmit(seq(3000), MSS as usize, at);
        r.on_probe_sent(seq(4000));
        // The probe's SACK reveals the lost tail.
        let out = r.on_ack(seq(1000), &[Some((3000, 4000)), None, None], seq(4000), true, t(50));
        assert!(out.entered_recovery);
        assert_eq!(r.next_lost(), Some((1000, MSS)));
        // No second probe while the first is outstanding.
        r.arm_probe(t(50), 3000, MSS as usize, true, None);
        assert_eq!(r.poll_at(), None);
    }

    #[test]
    fn without_sack_new_reno_marks_one_segment_per_partial_ack() {
        let mut r = Recovery::new();
        send(&mut r, 0, 5, t(0));
        assert!(r.on_duplicate_acks(3, seq(5000)));
        assert_eq!(r.next_lost(), Some((0, MSS)));
        r.on_transmit(seq(0), MSS as usize, t(1));
        r.on_ack(seq(2000), &[], seq(5000), false, t(12));
        assert_eq!(r.next_lost(), Some((2000, MSS)), "partial ACK");
        r.on_transmit(seq(2000), MSS as usize, t(13));
        let out = r.on_ack(seq(5000), &[], seq(5000), false, t(23));
        assert!(out.exited_recovery);
        assert_eq!(r.stats().recoveries, 1);
    }

    #[test]
    fn invalid_sack_blocks_are_ignored() {
        let mut r = Recovery::new();
        send(&mut r, 0, 4, t(0));
        let bogus = [Some((5000, 9000)), Some((3000, 2000)), Some((0u32.wrapping_sub(1000), 0))];
        let out = r.on_ack(seq(0), &bogus, seq(4000), true, t(10));
        assert!(!out.entered_recovery);
        assert_eq!(r.pipe(4000), 4000);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut r = Recovery::new();
        let base = u32::MAX - 2500;
        send(&mut r, base, 6, t(0));
        let l = base.wrapping_add(1000);
        let rr = base.wrapping_add(5000);
        let out = r.on_ack(seq(base), &[Some((l, rr)), None, None], seq(base.wrapping_add(6000)), true, t(10));
        assert!(out.entered_recovery);
        assert_eq!(r.next_lost(), Some((base, MSS)));
        r.on_transmit(seq(base), MSS as usize, t(11));
        let out = r.on_ack(seq(base.wrapping_add(6000)), &[None, None, None], seq(base.wrapping_add(6000)), true, t(21));
        assert!(out.exited_recovery);
        assert_eq!(r.pipe(0), 0);
    }

    #[test]
    fn an_rto_forgets_the_log() {
        let mut r = Recovery::new();
        send(&mut r, 0, 5, t(0));
        r.on_ack(seq(0), &[Some((1000, 5000)), None, None], seq(5000), true, t(10));
        r.on_rto(seq(5000));
        assert!(!r.in_recovery());
        assert_eq!(r.pipe(5000), 5000);
        assert_eq!(r.next_lost(), None);
        // Resending from the cumulative ACK logs afresh, as retransmissions: an ACK of the first
        // copies arriving now is no RTT sample.
        send(&mut r, 0, 5, t(300));
        assert_eq!(r.segs.len(), 5);
        let out = r.on_ack(seq(5000), &[None, None, None], seq(5000), true, t(301));
        assert_eq!(out.rtt_sample, None);
        send(&mut r, 5000, 1, t(302));
        assert_eq!(r.segs[0].flags, 0, "new data is new again");
    }
}
