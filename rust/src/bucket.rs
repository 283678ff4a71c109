//! The token-bucket math of `docs/design.md` section 1, in plain Rust.
//!
//! Amounts are integer millitokens, times integer milliseconds. A bucket's whole state is one
//! number, `full_at`: the instant it is full again, in *ticks* of `1 / step_milli` ms (see
//! [`Rate`]). Every intermediate value is an `i128` computed with checked arithmetic; amounts and
//! times must fit an `i64`, a `full_at` must fit a DynamoDB number (`|v| <= 10^38 - 1`), or the
//! call fails with [`CoreError::Overflow`]. Nothing here panics, whatever the input.
#![forbid(unsafe_code)]

use std::fmt;

/// Why a core call failed. A denial is not an error: it is an [`Outcome`] with `exceeded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// Invalid parameters (non-positive limit, negative time).
    Invalid(String),
    /// A result (or an input, at the Python boundary) does not fit its range.
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

/// The largest magnitude of a stored `full_at`: DynamoDB numbers hold 38 significant digits.
pub const FULL_AT_MAX: i128 = 99_999_999_999_999_999_999_999_999_999_999_999_999;

/// One bucket as given to [`decide`] and [`time_until_available`].
///
/// `full_at` is `None` when the bucket does not exist yet (it is then full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketInput {
    pub burst_milli: i64,
    pub refill_amount_milli: i64,
    pub refill_period_ms: i64,
    pub full_at: Option<i128>,
    pub delta_milli: i64,
}

/// How the repository must write a bucket's `full_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// No write (denied, or delta 0).
    None = 0,
    /// `full_at += write_value` under `cond_lo <= full_at [<= cond_hi]`.
    Relative = 1,
    /// `full_at = write_value` under `full_at <= cond_hi`, or "does not exist" when the input
    /// did not exist (no bounds then).
    Absolute = 2,
    /// `full_at += write_value` (negative) with no condition: a give-back, exact in any state.
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

/// The decision for one bucket (the Python API's `Outcome`, same fields in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub available_milli: i64,
    pub exceeded: bool,
    pub retry_after_ms: Option<i64>,
    pub write_mode: WriteMode,
    pub write_value: i128,
    /// The state after the write, assuming the stored state was the input's (`None`: the
    /// bucket still does not exist).
    pub new_full_at: Option<i128>,
    pub cond_lo: Option<i128>,
    pub cond_hi: Option<i128>,
}

// ---------------------------------------------------------------------------------------------
// checked i128 helpers

fn add(a: i128, b: i128) -> CoreResult<i128> {
    a.checked_add(b).ok_or(CoreError::Overflow)
}

fn sub(a: i128, b: i128) -> CoreResult<i128> {
    a.checked_sub(b).ok_or(CoreError::Overflow)
}

fn mul(a: i128, b: i128) -> CoreResult<i128> {
    a.checked_mul(b).ok_or(CoreError::Overflow)
}

/// `ceil(a / b)` for `b > 0`.
fn div_ceil(a: i128, b: i128) -> CoreResult<i128> {
    let q = a.checked_div_euclid(b).ok_or(CoreError::Overflow)?;
    if a.checked_rem_euclid(b).ok_or(CoreError::Overflow)? == 0 {
        Ok(q)
    } else {
        add(q, 1)
    }
}

/// An amount or a time: must fit i64.
fn fit(v: i128) -> CoreResult<i64> {
    i64::try_from(v).map_err(|_| CoreError::Overflow)
}

/// A stored `full_at` (or a bound on it): must fit a DynamoDB number.
fn level(v: i128) -> CoreResult<i128> {
    if (-FULL_AT_MAX..=FULL_AT_MAX).contains(&v) {
        Ok(v)
    } else {
        Err(CoreError::Overflow)
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

fn check_full_at(full_at: Option<i128>) -> CoreResult<()> {
    match full_at {
        Some(v) => level(v).map(|_| ()),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// a bucket seen at `now`

/// A limit in whole refill quanta: `step_milli` millitokens every `step_ms`. A *tick* is
/// `1 / step_milli` ms, so one ms is `step_milli` ticks and one millitoken is `step_ms` ticks:
/// consumption and refill are both whole numbers of ticks, and the bucket's state is exact.
#[derive(Debug, Clone, Copy)]
struct Rate {
    burst: i128,
    step_ms: i128,
    step_milli: i128,
}

impl Rate {
    /// Requires a validated limit (all > 0).
    fn new(burst: i64, amount: i64, period: i64) -> CoreResult<Rate> {
        let g = gcd(amount, period);
        Ok(Rate {
            burst: i128::from(burst),
            step_ms: i128::from(period.checked_div(g).ok_or(CoreError::Overflow)?),
            step_milli: i128::from(amount.checked_div(g).ok_or(CoreError::Overflow)?),
        })
    }

    /// `now` in ticks.
    fn ticks(&self, now_ms: i64) -> CoreResult<i128> {
        mul(i128::from(now_ms), self.step_milli)
    }

    /// Millitokens in ticks.
    fn of_milli(&self, milli: i128) -> CoreResult<i128> {
        mul(milli, self.step_ms)
    }
}

/// A bucket at `now`, before any delta.
#[derive(Debug, Clone, Copy)]
struct View {
    full_at: Option<i128>,
    now_ticks: i128,
    /// Ticks until the bucket is full again (0 when it is full: never negative).
    debt: i128,
    /// `burst - ceil(debt / step_ms)`: whole millitokens now (may be negative).
    available: i128,
}

impl View {
    fn new(r: &Rate, full_at: Option<i128>, now_ms: i64) -> CoreResult<View> {
        let now_ticks = r.ticks(now_ms)?;
        // A state full long ago may lie below `now_ticks` by more than i128 spans: no debt.
        let debt = match full_at {
            Some(f) if f > now_ticks => sub(f, now_ticks)?,
            _ => 0,
        };
        let available = sub(r.burst, div_ceil(debt, r.step_ms)?)?;
        Ok(View {
            full_at,
            now_ticks,
            debt,
            available,
        })
    }

    /// Whether `delta > 0` millitokens are there now: exact, in ticks (no rounding).
    fn covers(&self, r: &Rate, delta: i128) -> CoreResult<bool> {
        Ok(self.debt <= r.of_milli(sub(r.burst, delta)?)?)
    }

    /// Ms from `now` until `delta` millitokens are there: 0 if already or if `delta <= 0` (a
    /// release or a status needs nothing), `None` if `delta > burst` (never).
    fn wait(&self, r: &Rate, delta: i64, now_ms: i64) -> CoreResult<Option<i64>> {
        let delta = i128::from(delta);
        if delta > r.burst {
            return Ok(None);
        }
        if delta <= 0 || self.covers(r, delta)? {
            return Ok(Some(0));
        }
        // Not covered, so the bucket exists and is not full: the first ms `t` with
        // `full_at - t * step_milli <= (burst - delta) * step_ms`.
        let full_at = self.full_at.unwrap_or(self.now_ticks);
        let due = div_ceil(
            sub(full_at, r.of_milli(sub(r.burst, delta)?)?)?,
            r.step_milli,
        )?;
        fit(sub(due, i128::from(now_ms))?.max(0)).map(Some)
    }
}

// ---------------------------------------------------------------------------------------------
// public API

/// Millitokens available at `now_ms` (`burst` for a bucket that does not exist yet); negative
/// after forced consumption.
pub fn available(
    burst_milli: i64,
    refill_amount_milli: i64,
    refill_period_ms: i64,
    full_at: Option<i128>,
    now_ms: i64,
) -> CoreResult<i64> {
    check_limit(burst_milli, refill_amount_milli, refill_period_ms)?;
    check_full_at(full_at)?;
    check_now(now_ms)?;
    let r = Rate::new(burst_milli, refill_amount_milli, refill_period_ms)?;
    fit(View::new(&r, full_at, now_ms)?.available)
}

/// The `full_at` of a bucket holding `tokens_milli` at `now_ms` (at least burst: full now).
/// Converts a balance into the stored form: a bucket of another layout or another definition.
pub fn full_at_of(
    burst_milli: i64,
    refill_amount_milli: i64,
    refill_period_ms: i64,
    tokens_milli: i64,
    now_ms: i64,
) -> CoreResult<i128> {
    check_limit(burst_milli, refill_amount_milli, refill_period_ms)?;
    check_now(now_ms)?;
    let r = Rate::new(burst_milli, refill_amount_milli, refill_period_ms)?;
    let missing = sub(r.burst, i128::from(tokens_milli))?.max(0);
    level(add(r.ticks(now_ms)?, r.of_milli(missing)?)?)
}

/// Ms until every bucket with `delta > 0` has `delta` available (0 if already); `None` if some
/// delta exceeds its burst.
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
        let v = View::new(&r, b.full_at, now_ms)?;
        if let Some(w) = v.wait(&r, b.delta_milli, now_ms)? {
            longest = longest.max(w);
        }
    }
    Ok(Some(longest))
}

fn check_bucket(b: &BucketInput) -> CoreResult<()> {
    check_limit(b.burst_milli, b.refill_amount_milli, b.refill_period_ms)?;
    check_full_at(b.full_at)
}

/// One acquire decision over a flat list of buckets (see design.md, `decide`).
///
/// Returns `(admitted, outcomes)`, outcomes in input order. With `check`, it is all-or-nothing:
/// if any bucket is exceeded nothing is written. Without `check`, every delta is applied.
pub fn decide(
    buckets: &[BucketInput],
    now_ms: i64,
    check: bool,
) -> CoreResult<(bool, Vec<Outcome>)> {
    let mut out = Vec::with_capacity(buckets.len());
    let admitted = decide_into(buckets, now_ms, check, &mut out)?;
    Ok((admitted, out))
}

/// [`decide`] writing the outcomes into `out` (cleared first).
fn decide_into(
    buckets: &[BucketInput],
    now_ms: i64,
    check: bool,
    out: &mut Vec<Outcome>,
) -> CoreResult<bool> {
    out.clear();
    check_now(now_ms)?;
    for b in buckets {
        check_bucket(b)?;
    }

    // Pass 1: availability, exceeded, retry_after for every bucket.
    let mut admitted = true;
    let mut views = Vec::with_capacity(buckets.len());
    for b in buckets {
        let r = Rate::new(b.burst_milli, b.refill_amount_milli, b.refill_period_ms)?;
        let v = View::new(&r, b.full_at, now_ms)?;
        views.push((r, v));
        let exceeded = check && b.delta_milli > 0 && !v.covers(&r, i128::from(b.delta_milli))?;
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
            new_full_at: b.full_at,
            cond_lo: None,
            cond_hi: None,
        });
    }

    // Pass 2: the writes, only when admitted.
    if admitted {
        for ((b, (r, v)), o) in buckets.iter().zip(&views).zip(out.iter_mut()) {
            if b.delta_milli != 0 {
                write(r, v, b.delta_milli, check, o)?;
            }
        }
    }
    Ok(admitted)
}

/// Fill in the write of one admitted bucket with a non-zero delta.
///
/// Each rule is exact for every stored state its condition accepts, so a stale view never
/// over-admits, loses or doubles an update (design.md, "Concurrent writers").
fn write(r: &Rate, v: &View, delta: i64, check: bool, o: &mut Outcome) -> CoreResult<()> {
    let delta = i128::from(delta);
    let ticks = r.of_milli(delta)?;

    let Some(full_at) = v.full_at else {
        // Created full at now (the condition is "does not exist").
        let value = level(add(v.now_ticks, ticks.max(0))?)?;
        o.write_mode = WriteMode::Absolute;
        o.write_value = value;
        o.new_full_at = Some(value);
        return Ok(());
    };

    if delta < 0 {
        // A give-back commutes with every other write: a bucket never reads fuller than full,
        // so moving `full_at` back is exact in any state and needs no condition.
        o.write_mode = WriteMode::Add;
        o.write_value = level(ticks)?;
        o.new_full_at = Some(level(add(full_at, ticks)?)?);
        return Ok(());
    }

    if v.debt == 0 {
        // Full at now: the refill past the burst is lost, so the new state is absolute. Its
        // condition pins "full at my now"; a writer that finds the bucket refilled past that
        // by its own now is full there too and overwrites nothing it should have kept.
        let value = level(add(v.now_ticks, ticks)?)?;
        o.write_mode = WriteMode::Absolute;
        o.write_value = value;
        o.new_full_at = Some(value);
        o.cond_hi = Some(v.now_ticks);
        return Ok(());
    }

    // Not full at now: consumption moves `full_at` later by its ticks, applied to whatever is
    // stored, as long as the stored bucket is still not full at now (else the refill past the
    // burst would be counted) and, checked, still holds `delta`.
    o.write_mode = WriteMode::Relative;
    o.write_value = level(ticks)?;
    o.new_full_at = Some(level(add(full_at, ticks)?)?);
    o.cond_lo = Some(level(add(v.now_ticks, 1)?)?);
    if check {
        o.cond_hi = Some(level(add(v.now_ticks, r.of_milli(sub(r.burst, delta)?)?)?)?);
    }
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

    /// 100 tokens per minute, burst 100: `step_milli` 5, `step_ms` 3 (a tick is 0.2 ms).
    const PER_MIN_100: (i64, i64, i64) = (100_000, 100_000, 60_000);

    fn b(full_at: Option<i128>, delta: i64) -> BucketInput {
        let (burst, amount, period) = PER_MIN_100;
        BucketInput {
            burst_milli: burst,
            refill_amount_milli: amount,
            refill_period_ms: period,
            full_at,
            delta_milli: delta,
        }
    }

    #[test]
    fn refill_is_continuous() {
        let (bu, am, pe) = PER_MIN_100;
        // empty at 1_000 ms: full_at = 1_000 * 5 + 100_000 * 3 ticks
        let empty = full_at_of(bu, am, pe, 0, 1_000).unwrap();
        assert_eq!(empty, 305_000);
        let avail = |n| available(bu, am, pe, Some(empty), n).unwrap();
        assert_eq!(avail(1_000), 0);
        assert_eq!(avail(1_001), 1); // 5/3 milli per ms, floored
        assert_eq!(avail(1_003), 5);
        assert_eq!(avail(1_600), 1_000);
        assert_eq!(avail(61_000), 100_000);
        assert_eq!(avail(1_000_000), 100_000);
        assert_eq!(available(bu, am, pe, None, 5).unwrap(), 100_000);
        // in debt: beyond empty
        assert_eq!(
            available(bu, am, pe, Some(empty + 3_000), 1_000).unwrap(),
            -1_000
        );
    }

    #[test]
    fn retry_after_is_a_token_buckets() {
        // 2 per minute drained at t: one more is back after 30 s exactly.
        let two = (2_000, 2_000, 60_000);
        let drained = BucketInput {
            burst_milli: two.0,
            refill_amount_milli: two.1,
            refill_period_ms: two.2,
            full_at: None,
            delta_milli: 2_000,
        };
        let (ok, o) = decide(&[drained], 7_000, true).unwrap();
        assert!(ok);
        let again = BucketInput {
            full_at: o[0].new_full_at,
            delta_milli: 1_000,
            ..drained
        };
        let (ok, o) = decide(&[again], 7_000, true).unwrap();
        assert!(!ok);
        assert_eq!(o[0].retry_after_ms, Some(30_000));
        assert_eq!(time_until_available(&[again], 7_000).unwrap(), Some(30_000));
        assert_eq!(time_until_available(&[again], 37_000).unwrap(), Some(0));
    }

    #[test]
    fn consume_relative_and_absolute() {
        // a bucket that does not exist yet: created, absolute, no bounds
        let (ok, o) = decide(&[b(None, 1_000)], 10_000, true).unwrap();
        assert!(ok);
        assert_eq!(o[0].write_mode, WriteMode::Absolute);
        assert_eq!(o[0].write_value, 50_000 + 3_000);
        assert_eq!((o[0].cond_lo, o[0].cond_hi), (None, None));

        // full now (full_at in the past): absolute, conditioned on "full at now"
        let (_, o) = decide(&[b(Some(10), 2_000)], 6_000, true).unwrap();
        let o = o[0];
        assert_eq!(o.write_mode, WriteMode::Absolute);
        assert_eq!(o.write_value, 30_000 + 6_000);
        assert_eq!((o.cond_lo, o.cond_hi), (None, Some(30_000)));

        // not full: relative, bounded below by "not full at now", above by "holds delta"
        let half = full_at_of(100_000, 100_000, 60_000, 50_000, 10_000).unwrap();
        let (ok, o) = decide(&[b(Some(half), 1_000)], 10_000, true).unwrap();
        assert!(ok);
        let o = o[0];
        assert_eq!(o.write_mode, WriteMode::Relative);
        assert_eq!(o.write_value, 3_000);
        assert_eq!(o.new_full_at, Some(half + 3_000));
        assert_eq!(
            (o.cond_lo, o.cond_hi),
            (Some(50_001), Some(50_000 + 297_000))
        );

        // forced: no upper bound
        let (_, o) = decide(&[b(Some(half), 1_000)], 10_000, false).unwrap();
        assert_eq!((o[0].cond_lo, o[0].cond_hi), (Some(50_001), None));

        // a give-back: unconditional add
        let (_, o) = decide(&[b(Some(half), -1_000)], 10_000, true).unwrap();
        assert_eq!(o[0].write_mode, WriteMode::Add);
        assert_eq!(o[0].write_value, -3_000);
        assert_eq!((o[0].cond_lo, o[0].cond_hi), (None, None));
    }

    #[test]
    fn denied_all_or_nothing() {
        let short = full_at_of(100_000, 100_000, 60_000, 500, 0).unwrap();
        let buckets = [b(None, 1_000), b(Some(short), 1_000)];
        let (ok, o) = decide(&buckets, 0, true).unwrap();
        assert!(!ok);
        assert!(o.iter().all(|o| o.write_mode == WriteMode::None));
        assert!(!o[0].exceeded && o[1].exceeded);
        // 500 milli short at 5/3 milli per ms: 300 ms
        assert_eq!(o[1].retry_after_ms, Some(300));
        assert_eq!(o[0].new_full_at, None);
        assert_eq!(time_until_available(&buckets, 0).unwrap(), Some(300));
        let (_, o) = decide(&[b(None, 100_001)], 0, true).unwrap();
        assert_eq!(o[0].retry_after_ms, None);
        // a long-full bucket is still only full: more than burst is never covered
        let (ok, _) = decide(&[b(Some(-1_000_000), 100_001)], 1_000, true).unwrap();
        assert!(!ok);
        // forced: admitted, goes negative
        let (ok, o) = decide(&[b(Some(short), 1_000)], 0, false).unwrap();
        assert!(ok && !o[0].exceeded);
        let after = o[0].new_full_at;
        assert_eq!(available(100_000, 100_000, 60_000, after, 0).unwrap(), -500);
    }

    #[test]
    fn extremes_do_not_panic() {
        let vals = [i64::MIN, i64::MIN + 1, -1, 0, 1, 2, i64::MAX - 1, i64::MAX];
        let levels = [
            None,
            Some(FULL_AT_MAX),
            Some(-FULL_AT_MAX),
            Some(0),
            Some(1),
        ];
        for &x in &vals {
            for &y in &vals {
                for &f in &levels {
                    let bi = BucketInput {
                        burst_milli: y,
                        refill_amount_milli: x,
                        refill_period_ms: 1,
                        full_at: f,
                        delta_milli: x,
                    };
                    let _ = decide(&[bi], y, true);
                    let _ = decide(&[bi], y, false);
                    let _ = time_until_available(&[bi], x);
                    let _ = available(i64::MAX, 1, i64::MAX, f, x);
                    let _ = full_at_of(y, x, i64::MAX, x, y);
                }
            }
        }
    }

    #[test]
    fn errors() {
        assert!(matches!(
            available(0, 1, 1, None, 0),
            Err(CoreError::Invalid(_))
        ));
        assert!(matches!(
            available(1, 1, 1, None, -1),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(
            available(1, 1, 1, Some(FULL_AT_MAX + 1), 0),
            Err(CoreError::Overflow)
        );
        // a debt far beyond i64 millitokens
        assert_eq!(
            available(1, 1, 1, Some(FULL_AT_MAX), 0),
            Err(CoreError::Overflow)
        );
        assert_eq!(
            CoreError::Overflow.to_string(),
            "integer overflow in token-bucket arithmetic"
        );
    }
}
