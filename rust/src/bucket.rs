//! The token-bucket math of `docs/design.md` section 1, in plain Rust.
//!
//! Amounts are integer millitokens, times integer milliseconds. Every intermediate value is an
//! `i128` computed with checked arithmetic; every result must fit an `i64` or the call fails with
//! [`CoreError::Overflow`]. Nothing here panics, whatever the input.
#![forbid(unsafe_code)]

use std::fmt;

/// Why a core call failed. A denial is not an error: it is an [`Outcome`] with `exceeded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// Invalid parameters (non-positive limit, half a state, negative time).
    Invalid(String),
    /// A result (or an input, at the Python boundary) does not fit a signed 64-bit integer.
    Overflow,
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::Invalid(msg) => f.write_str(msg),
            CoreError::Overflow => f.write_str("integer overflow in token-bucket arithmetic"),
        }
    }
}

impl std::error::Error for CoreError {}

pub type CoreResult<T> = Result<T, CoreError>;

/// One bucket as given to [`decide`] and [`time_until_available`].
///
/// `tokens_milli` and `last_refill_ms` are both `None` when the bucket does not exist yet (it is
/// then full: `burst_milli` tokens anchored at `now_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketInput {
    pub burst_milli: i64,
    pub refill_amount_milli: i64,
    pub refill_period_ms: i64,
    pub tokens_milli: Option<i64>,
    pub last_refill_ms: Option<i64>,
    pub delta_milli: i64,
}

/// How the repository must write a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// No write (denied, or delta 0).
    None = 0,
    /// `tokens += write_value`, anchor set to `new_last_refill_ms`.
    Relative = 1,
    /// `tokens = write_value`, anchor set to `new_last_refill_ms`.
    Absolute = 2,
    /// `tokens += write_value` with no condition and the anchor untouched: a give-back, exact
    /// whatever the stored state (a bucket never holds more than its burst when read).
    Add = 3,
}

impl WriteMode {
    /// The integer code used at the Python boundary.
    pub fn code(self) -> i64 {
        match self {
            WriteMode::None => 0,
            WriteMode::Relative => 1,
            WriteMode::Absolute => 2,
            WriteMode::Add => 3,
        }
    }
}

/// The decision for one bucket (the 9-tuple of the Python API, in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub available_milli: i64,
    pub exceeded: bool,
    pub retry_after_ms: Option<i64>,
    pub write_mode: WriteMode,
    pub write_value: i64,
    pub new_tokens_milli: i64,
    pub new_last_refill_ms: i64,
    pub cond_lo: Option<i64>,
    pub cond_hi: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// checked i128 helpers: a failure can only mean the final result does not fit i64 either.

fn add(a: i128, b: i128) -> CoreResult<i128> {
    a.checked_add(b).ok_or(CoreError::Overflow)
}

fn sub(a: i128, b: i128) -> CoreResult<i128> {
    a.checked_sub(b).ok_or(CoreError::Overflow)
}

fn mul(a: i128, b: i128) -> CoreResult<i128> {
    a.checked_mul(b).ok_or(CoreError::Overflow)
}

fn div(a: i128, b: i128) -> CoreResult<i128> {
    a.checked_div(b).ok_or(CoreError::Overflow)
}

/// The result must fit i64.
fn fit(v: i128) -> CoreResult<i64> {
    i64::try_from(v).map_err(|_| CoreError::Overflow)
}

/// A lower bound `tokens >= v`: below `i64::MIN` it holds for every stored value, so it is
/// reported as no bound at all.
fn lower_bound(v: i128) -> CoreResult<Option<i64>> {
    if v < i128::from(i64::MIN) {
        Ok(None)
    } else {
        fit(v).map(Some)
    }
}

/// The refill a full bucket may forfeit when a write re-anchors it: one token or 1% of the burst.
const FORFEIT_DIVISOR: i128 = 100;
const ONE_TOKEN_MILLI: i128 = 1000;

/// The epoch of a limit, in ms: the longest whole number of quanta whose refill is at most
/// `max(1 token, burst / 100)`, at least one quantum, at most `max(reanchor_ms, one quantum)`.
fn epoch_ms(r: &Rate, reanchor_ms: i64) -> CoreResult<i128> {
    let budget = div(r.burst, FORFEIT_DIVISOR)?.max(ONE_TOKEN_MILLI);
    let quanta = div(budget, r.step_milli)?.max(1);
    let longest = i128::from(reanchor_ms).max(r.step_ms);
    Ok(mul(quanta, r.step_ms)?.min(longest))
}

/// The first epoch boundary at or after `now` (`now >= 0`, `epoch > 0`).
fn epoch_start(now: i128, epoch: i128) -> CoreResult<i128> {
    let floor = mul(div(now, epoch)?, epoch)?;
    if floor == now {
        Ok(now)
    } else {
        add(floor, epoch)
    }
}

fn gcd(mut a: i64, mut b: i64) -> i64 {
    // Only called with a, b > 0, so `checked_rem` never fails.
    while b != 0 {
        let r = a.checked_rem(b).unwrap_or(0);
        a = b;
        b = r;
    }
    a
}

// ---------------------------------------------------------------------------------------------
// validation

fn check_now(now_ms: i64) -> CoreResult<()> {
    if now_ms < 0 {
        return Err(CoreError::Invalid(format!(
            "now_ms must be >= 0, got {now_ms}"
        )));
    }
    Ok(())
}

fn check_limit(burst: i64, amount: i64, period: i64) -> CoreResult<()> {
    if burst <= 0 {
        return Err(CoreError::Invalid(format!(
            "burst_milli must be > 0, got {burst}"
        )));
    }
    if amount <= 0 {
        return Err(CoreError::Invalid(format!(
            "refill_amount_milli must be > 0, got {amount}"
        )));
    }
    if period <= 0 {
        return Err(CoreError::Invalid(format!(
            "refill_period_ms must be > 0, got {period}"
        )));
    }
    Ok(())
}

fn check_state(tokens: Option<i64>, last_refill: Option<i64>) -> CoreResult<()> {
    if tokens.is_some() != last_refill.is_some() {
        return Err(CoreError::Invalid(
            "tokens_milli and last_refill_ms must both be given or both be None".to_owned(),
        ));
    }
    Ok(())
}

fn check_bucket(b: &BucketInput) -> CoreResult<()> {
    check_limit(b.burst_milli, b.refill_amount_milli, b.refill_period_ms)?;
    check_state(b.tokens_milli, b.last_refill_ms)
}

// ---------------------------------------------------------------------------------------------
// the lazily refilled view of a bucket at `now`

/// A limit reduced to whole refill quanta: `step_milli` tokens every `step_ms`.
#[derive(Debug, Clone, Copy)]
struct Rate {
    burst: i128,
    step_ms: i128,
    step_milli: i128,
    /// `step_ms` as i64 (it is at most `period`), for the fast path of [`quanta`].
    step_ms_64: i64,
}

impl Rate {
    /// Requires a validated limit (all > 0).
    fn new(burst: i64, amount: i64, period: i64) -> CoreResult<Rate> {
        let g = gcd(amount, period);
        let step_ms_64 = period.checked_div(g).ok_or(CoreError::Overflow)?;
        let step_milli = amount.checked_div(g).ok_or(CoreError::Overflow)?;
        Ok(Rate {
            burst: i128::from(burst),
            step_ms: i128::from(step_ms_64),
            step_milli: i128::from(step_milli),
            step_ms_64,
        })
    }

    /// Whole quanta in `elapsed` ms (0 if not positive). i128 division is a slow library call,
    /// so elapsed times that fit i64 (all real ones) divide as i64.
    fn quanta(&self, elapsed: i128) -> CoreResult<i128> {
        if elapsed <= 0 {
            return Ok(0);
        }
        match i64::try_from(elapsed) {
            Ok(e) => e
                .checked_div(self.step_ms_64)
                .map(i128::from)
                .ok_or(CoreError::Overflow),
            Err(_) => div(elapsed, self.step_ms),
        }
    }
}

/// A bucket seen at `now`, before any delta.
#[derive(Debug, Clone, Copy)]
struct View {
    exists: bool,
    tokens: i128,
    last: i128,
    /// `now - last` (may be negative: an anchor in the future).
    elapsed: i128,
    /// Whole quanta since the anchor (0 for an anchor in the future).
    q: i128,
    /// `q * step_milli`.
    added: i128,
    /// `min(burst, tokens + added)`.
    available: i128,
}

impl View {
    /// Requires a validated state (both or neither given).
    fn new(r: &Rate, tokens: Option<i64>, last: Option<i64>, now: i64) -> CoreResult<View> {
        let now = i128::from(now);
        match (tokens, last) {
            (Some(t), Some(l)) => {
                let (tokens, last) = (i128::from(t), i128::from(l));
                let elapsed = sub(now, last)?;
                let q = r.quanta(elapsed)?;
                let added = mul(q, r.step_milli)?;
                let available = add(tokens, added)?.min(r.burst);
                Ok(View {
                    exists: true,
                    tokens,
                    last,
                    elapsed,
                    q,
                    added,
                    available,
                })
            }
            _ => Ok(View {
                exists: false,
                tokens: r.burst,
                last: now,
                elapsed: 0,
                q: 0,
                added: 0,
                available: r.burst,
            }),
        }
    }

    /// Ms from `now` until `available >= delta`: 0 if already or if `delta <= 0` (a release or a
    /// status needs nothing), `None` if `delta > burst`.
    fn wait(&self, r: &Rate, delta: i64, now: i64) -> CoreResult<Option<i64>> {
        let delta = i128::from(delta);
        if delta > r.burst {
            return Ok(None);
        }
        if delta <= 0 || self.available >= delta {
            return Ok(Some(0));
        }
        // available < delta <= burst, so refill is not capped: available = tokens + added. The
        // first quantum covering the shortfall is the k-th after the current one.
        let need = sub(delta, self.available)?;
        let k = div(sub(add(need, r.step_milli)?, 1)?, r.step_milli)?;
        let anchor_now = add(self.last, mul(self.q, r.step_ms)?)?;
        let due = add(anchor_now, mul(k, r.step_ms)?)?;
        fit(sub(due, i128::from(now))?).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// public API

/// Tokens available at `now_ms` (`burst` for a bucket that does not exist yet).
pub fn available(
    burst_milli: i64,
    refill_amount_milli: i64,
    refill_period_ms: i64,
    tokens_milli: Option<i64>,
    last_refill_ms: Option<i64>,
    now_ms: i64,
) -> CoreResult<i64> {
    check_limit(burst_milli, refill_amount_milli, refill_period_ms)?;
    check_state(tokens_milli, last_refill_ms)?;
    check_now(now_ms)?;
    let r = Rate::new(burst_milli, refill_amount_milli, refill_period_ms)?;
    let v = View::new(&r, tokens_milli, last_refill_ms, now_ms)?;
    fit(v.available)
}

/// Eager refill to `now_ms`: `(tokens, last_refill)`. A bucket that reaches burst is capped and
/// re-anchored at `now_ms`; otherwise the anchor moves by whole quanta only.
pub fn refill(
    burst_milli: i64,
    refill_amount_milli: i64,
    refill_period_ms: i64,
    tokens_milli: i64,
    last_refill_ms: i64,
    now_ms: i64,
) -> CoreResult<(i64, i64)> {
    check_limit(burst_milli, refill_amount_milli, refill_period_ms)?;
    check_now(now_ms)?;
    let r = Rate::new(burst_milli, refill_amount_milli, refill_period_ms)?;
    let v = View::new(&r, Some(tokens_milli), Some(last_refill_ms), now_ms)?;
    let total = add(v.tokens, v.added)?;
    if total >= r.burst {
        Ok((burst_milli, now_ms))
    } else {
        Ok((fit(total)?, fit(add(v.last, mul(v.q, r.step_ms)?)?)?))
    }
}

/// Ms until every bucket with `delta > 0` has `available >= delta` (0 if already); `None` if
/// some delta exceeds its burst.
pub fn time_until_available(buckets: &[BucketInput], now_ms: i64) -> CoreResult<Option<i64>> {
    check_now(now_ms)?;
    for b in buckets {
        check_bucket(b)?;
    }
    if buckets.iter().any(|b| b.delta_milli > b.burst_milli) {
        return Ok(None);
    }
    let mut longest = 0_i64;
    for b in buckets {
        let r = Rate::new(b.burst_milli, b.refill_amount_milli, b.refill_period_ms)?;
        let v = View::new(&r, b.tokens_milli, b.last_refill_ms, now_ms)?;
        if let Some(w) = v.wait(&r, b.delta_milli, now_ms)? {
            longest = longest.max(w);
        }
    }
    Ok(Some(longest))
}

/// One acquire decision over a flat list of buckets (see design.md, `decide`).
///
/// Returns `(admitted, outcomes)`, outcomes in input order. With `check`, it is all-or-nothing:
/// if any bucket is exceeded nothing is written. Without `check`, every delta is applied.
pub fn decide(
    buckets: &[BucketInput],
    now_ms: i64,
    check: bool,
    reanchor_ms: i64,
) -> CoreResult<(bool, Vec<Outcome>)> {
    let mut out = Vec::with_capacity(buckets.len());
    let admitted = decide_into(buckets, now_ms, check, reanchor_ms, &mut out)?;
    Ok((admitted, out))
}

/// [`decide`] writing the outcomes into `out` (cleared first).
fn decide_into(
    buckets: &[BucketInput],
    now_ms: i64,
    check: bool,
    reanchor_ms: i64,
    out: &mut Vec<Outcome>,
) -> CoreResult<bool> {
    out.clear();
    check_now(now_ms)?;
    if reanchor_ms < 0 {
        return Err(CoreError::Invalid(format!(
            "reanchor_ms must be >= 0, got {reanchor_ms}"
        )));
    }
    for b in buckets {
        check_bucket(b)?;
    }

    // Pass 1: availability, exceeded, retry_after for every bucket.
    let mut admitted = true;
    let mut views = Vec::with_capacity(buckets.len());
    for b in buckets {
        let r = Rate::new(b.burst_milli, b.refill_amount_milli, b.refill_period_ms)?;
        let v = View::new(&r, b.tokens_milli, b.last_refill_ms, now_ms)?;
        views.push((r, v));
        let exceeded = check && b.delta_milli > 0 && v.available < i128::from(b.delta_milli);
        let retry_after_ms = if exceeded {
            v.wait(&r, b.delta_milli, now_ms)?
        } else {
            Some(0)
        };
        admitted &= !exceeded;
        out.push(Outcome {
            available_milli: fit(v.available)?,
            exceeded,
            retry_after_ms,
            write_mode: WriteMode::None,
            write_value: 0,
            new_tokens_milli: fit(v.tokens)?,
            new_last_refill_ms: fit(v.last)?,
            cond_lo: None,
            cond_hi: None,
        });
    }

    // Pass 2: the writes, only when admitted.
    if admitted {
        for ((b, (r, v)), o) in buckets.iter().zip(&views).zip(out.iter_mut()) {
            if b.delta_milli != 0 {
                write(r, v, b.delta_milli, now_ms, check, reanchor_ms, o)?;
            }
        }
    }
    Ok(admitted)
}

/// Fill in the write of one admitted bucket with a non-zero delta.
fn write(
    r: &Rate,
    v: &View,
    delta: i64,
    now_ms: i64,
    check: bool,
    reanchor_ms: i64,
    o: &mut Outcome,
) -> CoreResult<()> {
    let delta = i128::from(delta);
    let absolute_value = fit(sub(r.burst, delta.max(0))?)?;

    if !v.exists {
        // Created full: anchored like a write to a full bucket (below), so that the writers
        // racing to create it find it relative-writable once it exists. The condition is
        // "attribute does not exist".
        o.write_mode = WriteMode::Absolute;
        o.write_value = absolute_value;
        o.new_tokens_milli = absolute_value;
        o.new_last_refill_ms = fit(epoch_start(i128::from(now_ms), epoch_ms(r, reanchor_ms)?)?)?;
        return Ok(());
    }

    if delta < 0 {
        // A give-back commutes with every other write: adding tokens is exact in any state,
        // since reading caps at burst. No condition, so concurrent writers never conflict.
        o.write_mode = WriteMode::Add;
        o.write_value = fit(sub(0, delta)?)?;
        o.new_tokens_milli = fit(sub(v.tokens, delta)?)?;
        o.new_last_refill_ms = fit(v.last)?;
        return Ok(());
    }

    let cap_point = add(sub(r.burst, v.added)?, delta.min(0))?;
    if v.tokens >= cap_point {
        // Full now: the refill past the burst is lost, so the write must be absolute. It
        // re-anchors the bucket at the next epoch boundary, deferring its refill until then: the
        // writes that follow within the epoch see a bucket that cannot fill up again, so they
        // are relative and concurrent writers all apply without invalidating each other. The
        // refill forfeited is at most one epoch's (`epoch_ms`).
        let anchor = epoch_start(i128::from(now_ms), epoch_ms(r, reanchor_ms)?)?;
        o.write_mode = WriteMode::Absolute;
        o.cond_lo = lower_bound(cap_point)?;
        o.write_value = absolute_value;
        o.new_tokens_milli = absolute_value;
        o.new_last_refill_ms = fit(anchor)?;
        return Ok(());
    }

    // Not capped: tokens + added - min(delta, 0) < burst, so available = tokens + added.
    o.write_mode = WriteMode::Relative;
    o.cond_hi = Some(fit(sub(cap_point, 1)?)?);
    if check && delta > 0 {
        o.cond_lo = lower_bound(sub(delta, v.added)?)?;
    }
    let (value, anchor) = if v.q > 0 && v.elapsed >= i128::from(reanchor_ms) {
        (sub(v.added, delta)?, add(v.last, mul(v.q, r.step_ms)?)?)
    } else {
        (sub(0, delta)?, v.last)
    };
    o.write_value = fit(value)?;
    o.new_tokens_milli = fit(add(v.tokens, value)?)?;
    o.new_last_refill_ms = fit(anchor)?;
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    /// 100 tokens per minute, burst 100: a quantum is 1 token (1000 milli) every 600 ms.
    const PER_MIN_100: (i64, i64, i64) = (100_000, 100_000, 60_000);

    fn b(tokens: Option<i64>, last: Option<i64>, delta: i64) -> BucketInput {
        let (burst, amount, period) = PER_MIN_100;
        BucketInput {
            burst_milli: burst,
            refill_amount_milli: amount,
            refill_period_ms: period,
            tokens_milli: tokens,
            last_refill_ms: last,
            delta_milli: delta,
        }
    }

    #[test]
    fn quanta() {
        let (bu, am, pe) = PER_MIN_100;
        // 1 token every 600 ms is, in whole quanta, 5 milli every 3 ms
        let avail = |t, l, n| available(bu, am, pe, Some(t), Some(l), n).unwrap();
        assert_eq!(avail(0, 1_000, 1_002), 0);
        assert_eq!(avail(0, 1_000, 1_003), 5);
        assert_eq!(avail(0, 1_000, 1_599), 995);
        assert_eq!(avail(0, 1_000, 1_600), 1_000);
        assert_eq!(avail(0, 1_000, 1_000_000), 100_000);
        assert_eq!(available(bu, am, pe, None, None, 5).unwrap(), 100_000);
        // a future anchor refills nothing
        assert_eq!(avail(-5, 9_000, 1_000), -5);
        assert_eq!(refill(bu, am, pe, 0, 1_000, 2_300).unwrap(), (2_165, 2_299));
        assert_eq!(
            refill(bu, am, pe, 99_500, 1_000, 2_300).unwrap(),
            (100_000, 2_300)
        );
    }

    #[test]
    fn consume_relative_and_absolute() {
        // a bucket that does not exist yet: created full, absolute, no bounds, anchored at the
        // epoch boundary (reanchor_ms 0: one quantum of 3 ms)
        let (ok, o) = decide(&[b(None, None, 1_000)], 10_000, true, 0).unwrap();
        assert!(ok);
        assert_eq!(o[0].write_mode, WriteMode::Absolute);
        assert_eq!(
            (o[0].write_value, o[0].new_last_refill_ms),
            (99_000, 10_002)
        );
        // epoch of 100/minute with a 60 s reanchor interval: the quanta of one token, 600 ms
        let (_, o) = decide(&[b(None, None, 1_000)], 10_000, true, 60_000).unwrap();
        assert_eq!(o[0].new_last_refill_ms, 10_200);
        assert_eq!((o[0].cond_lo, o[0].cond_hi), (None, None));

        // existing, not full, no quantum yet: relative
        let (ok, o) = decide(&[b(Some(50_000), Some(10_000), 1_000)], 10_002, true, 0).unwrap();
        assert!(ok);
        let o = o[0];
        assert_eq!(o.write_mode, WriteMode::Relative);
        assert_eq!(o.write_value, -1_000);
        assert_eq!((o.new_tokens_milli, o.new_last_refill_ms), (49_000, 10_000));
        assert_eq!((o.cond_lo, o.cond_hi), (Some(1_000), Some(99_999)));

        // 233 quanta elapsed, reanchor threshold met: the refill is folded in
        let (_, o) = decide(&[b(Some(50_000), Some(10_000), 1_000)], 10_700, true, 0).unwrap();
        let o = o[0];
        let state = (o.write_value, o.new_tokens_milli, o.new_last_refill_ms);
        assert_eq!(state, (165, 50_165, 10_699));
        assert_eq!((o.cond_lo, o.cond_hi), (Some(-165), Some(98_834)));

        // threshold not met: anchor kept
        let (_, o) = decide(&[b(Some(50_000), Some(10_000), 1_000)], 10_700, true, 1_000).unwrap();
        let o = o[0];
        let state = (o.write_value, o.new_tokens_milli, o.new_last_refill_ms);
        assert_eq!(state, (-1_000, 49_000, 10_000));

        // full existing bucket: absolute, re-anchored at now
        let (_, o) = decide(&[b(Some(99_000), Some(0), 2_000)], 6_000, true, 0).unwrap();
        let o = o[0];
        assert_eq!(o.write_mode, WriteMode::Absolute);
        assert_eq!((o.write_value, o.new_last_refill_ms), (98_000, 6_000));
        assert_eq!((o.cond_lo, o.cond_hi), (Some(90_000), None));
    }

    #[test]
    fn denied_all_or_nothing() {
        let buckets = [b(None, None, 1_000), b(Some(500), Some(0), 1_000)];
        let (ok, o) = decide(&buckets, 0, true, 0).unwrap();
        assert!(!ok);
        assert!(o.iter().all(|o| o.write_mode == WriteMode::None));
        assert!(!o[0].exceeded && o[1].exceeded);
        assert_eq!(o[1].retry_after_ms, Some(300));
        assert_eq!(
            (o[0].new_tokens_milli, o[0].new_last_refill_ms),
            (100_000, 0)
        );
        assert_eq!(time_until_available(&buckets, 0).unwrap(), Some(300));
        let (_, o) = decide(&[b(None, None, 100_001)], 0, true, 0).unwrap();
        assert_eq!(o[0].retry_after_ms, None);
        // forced: admitted, goes negative
        let (ok, o) = decide(&[b(Some(500), Some(0), 1_000)], 0, false, 0).unwrap();
        assert!(ok && !o[0].exceeded);
        assert_eq!(o[0].new_tokens_milli, -500);
        assert_eq!(o[0].cond_lo, None);
    }

    #[test]
    fn extremes_do_not_panic() {
        let vals = [i64::MIN, i64::MIN + 1, -1, 0, 1, 2, i64::MAX - 1, i64::MAX];
        for &x in &vals {
            for &y in &vals {
                let bi = BucketInput {
                    burst_milli: y,
                    refill_amount_milli: x,
                    refill_period_ms: 1,
                    tokens_milli: Some(x),
                    last_refill_ms: Some(y),
                    delta_milli: x,
                };
                let _ = decide(&[bi], y, true, 0);
                let _ = decide(&[bi], y, false, x);
                let _ = time_until_available(&[bi], x);
                let _ = refill(i64::MAX, x, y, x, y, i64::MAX);
                let _ = available(i64::MAX, 1, i64::MAX, Some(x), Some(y), x);
            }
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            available(0, 1, 1, None, None, 0),
            Err(CoreError::Invalid(_))
        ));
        assert!(matches!(
            available(1, 1, 1, Some(1), None, 0),
            Err(CoreError::Invalid(_))
        ));
        assert!(matches!(
            available(1, 1, 1, None, None, -1),
            Err(CoreError::Invalid(_))
        ));
        assert!(matches!(
            decide(&[], 0, true, -1),
            Err(CoreError::Invalid(_))
        ));
        // release of i64::MIN from a very negative bucket: write value -delta does not fit
        let bi = BucketInput {
            burst_milli: i64::MAX,
            refill_amount_milli: 1,
            refill_period_ms: 1,
            tokens_milli: Some(i64::MIN),
            last_refill_ms: Some(0),
            delta_milli: i64::MIN,
        };
        assert_eq!(decide(&[bi], 0, false, 0), Err(CoreError::Overflow));
        // a retry far beyond i64
        let slow = BucketInput {
            burst_milli: i64::MAX,
            refill_amount_milli: 1,
            refill_period_ms: i64::MAX,
            tokens_milli: Some(0),
            last_refill_ms: Some(0),
            delta_milli: 3,
        };
        assert_eq!(time_until_available(&[slow], 0), Err(CoreError::Overflow));
        assert_eq!(
            CoreError::Overflow.to_string(),
            "integer overflow in token-bucket arithmetic"
        );
    }
}
