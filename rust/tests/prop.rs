//! Property tests of the token-bucket core (docs/design.md section 1).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::panic
)]

use proptest::prelude::*;
use zae_limiter_core::{
    available, decide, full_at_of, time_until_available, BucketInput, CoreError, Outcome,
    WriteMode, FULL_AT_MAX,
};

/// Any i64, biased towards the edges.
fn any_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MIN + 1),
        Just(-1_i64),
        Just(0_i64),
        Just(1_i64),
        Just(2_i64),
        Just(i64::MAX - 1),
        Just(i64::MAX),
        -1_000_i64..1_000,
        any::<i64>(),
    ]
}

fn any_level() -> impl Strategy<Value = Option<i128>> {
    prop_oneof![
        Just(None),
        Just(Some(FULL_AT_MAX)),
        Just(Some(-FULL_AT_MAX)),
        Just(Some(FULL_AT_MAX + 1)),
        Just(Some(i128::MIN)),
        any_i64().prop_map(|v| Some(i128::from(v))),
        any::<i128>().prop_map(Some),
    ]
}

fn any_bucket() -> impl Strategy<Value = BucketInput> {
    (any_i64(), any_i64(), any_i64(), any_level(), any_i64()).prop_map(
        |(burst_milli, refill_amount_milli, refill_period_ms, full_at, delta_milli)| BucketInput {
            burst_milli,
            refill_amount_milli,
            refill_period_ms,
            full_at,
            delta_milli,
        },
    )
}

/// A valid limit in realistic ranges (plus a few extreme rates).
fn limit() -> impl Strategy<Value = (i64, i64, i64)> {
    prop_oneof![
        (
            1_i64..=1_000_000_000,
            1_i64..=1_000_000_000,
            1_i64..=86_400_000
        ),
        (1_i64..=10_000, 1_i64..=10_000, 1_i64..=10_000),
        (Just(i64::MAX), 1_i64..=1_000, 1_i64..=1_000),
    ]
}

/// A valid bucket: a limit, a state around it (or none), a delta.
fn valid_bucket(now: i64) -> impl Strategy<Value = BucketInput> {
    (
        limit(),
        any::<bool>(),
        -2_000_000_000_i64..=2_000_000_000,
        0_i64..=100_000,
        0_u8..4,
    )
        .prop_flat_map(move |((burst, amount, period), exists, t, back, dkind)| {
            // a state that held `t` (at most burst) `back` ms ago
            let full_at = if exists {
                full_at_of(burst, amount, period, t.min(burst), now - back).ok()
            } else {
                None
            };
            let delta = match dkind {
                0 => Just(0_i64).boxed(),
                1 => (1_i64..=burst.min(2_000_000_000)).boxed(),
                2 => (-burst.min(2_000_000_000)..=-1).boxed(),
                _ => (burst.saturating_add(1)..=burst.saturating_add(10)).boxed(),
            };
            delta.prop_map(move |delta_milli| BucketInput {
                burst_milli: burst,
                refill_amount_milli: amount,
                refill_period_ms: period,
                full_at,
                delta_milli,
            })
        })
}

fn now_strategy() -> impl Strategy<Value = i64> {
    1_000_000_i64..=4_000_000_000_000
}

fn avail_of(b: &BucketInput, full_at: Option<i128>, now: i64) -> i64 {
    available(
        b.burst_milli,
        b.refill_amount_milli,
        b.refill_period_ms,
        full_at,
        now,
    )
    .unwrap()
}

/// `min(burst, avail - delta)`, exactly.
fn minus_capped(avail: i64, b: &BucketInput) -> i64 {
    let v = (i128::from(avail) - i128::from(b.delta_milli)).min(i128::from(b.burst_milli));
    i64::try_from(v).unwrap()
}

/// Apply an outcome's write to a stored `full_at` (None: it does not exist).
fn apply(o: &Outcome, stored: Option<i128>) -> Option<i128> {
    match o.write_mode {
        WriteMode::None => stored,
        WriteMode::Absolute => Some(o.write_value),
        // DynamoDB's ADD on a missing number starts from 0: long full
        WriteMode::Add => Some(stored.unwrap_or(0) + o.write_value),
        WriteMode::Relative => Some(stored.unwrap() + o.write_value),
    }
}

/// The condition DynamoDB evaluates for the write (repository.bucket_update_request).
fn holds(o: &Outcome, stored: Option<i128>, input: Option<i128>) -> bool {
    match o.write_mode {
        WriteMode::None | WriteMode::Add => true,
        _ if input.is_none() => stored.is_none(),
        _ => stored.is_some_and(|f| {
            o.cond_lo.is_none_or(|lo| f >= lo) && o.cond_hi.is_none_or(|hi| f <= hi)
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn nothing_panics(
        buckets in prop::collection::vec(any_bucket(), 0..5),
        now in any_i64(),
        check in any::<bool>(),
        b in any_bucket(),
    ) {
        let _ = decide(&buckets, now, check);
        let _ = time_until_available(&buckets, now);
        let _ = available(b.burst_milli, b.refill_amount_milli, b.refill_period_ms, b.full_at, now);
        let _ = full_at_of(b.burst_milli, b.refill_amount_milli, b.refill_period_ms, b.delta_milli, now);
    }

    #[test]
    fn errors_are_classified(b in any_bucket(), now in any_i64()) {
        let r = available(b.burst_milli, b.refill_amount_milli, b.refill_period_ms, b.full_at, now);
        let invalid = b.burst_milli <= 0 || b.refill_amount_milli <= 0
            || b.refill_period_ms <= 0 || now < 0;
        let out_of_range = b.full_at.is_some_and(|f| !(-FULL_AT_MAX..=FULL_AT_MAX).contains(&f));
        if invalid && !out_of_range {
            prop_assert!(matches!(r, Err(CoreError::Invalid(_))));
        }
        if out_of_range {
            prop_assert!(r.is_err());
        }
        // available is capped at burst
        if let Ok(a) = r {
            prop_assert!(a <= b.burst_milli);
        }
    }

    /// `full_at_of` is the inverse of `available` at that instant.
    #[test]
    fn full_at_of_holds_the_balance(
        (burst, amount, period) in limit(),
        t in -2_000_000_000_i64..=2_000_000_000,
        now in now_strategy(),
    ) {
        if let Ok(f) = full_at_of(burst, amount, period, t, now) {
            prop_assert_eq!(available(burst, amount, period, Some(f), now).unwrap(), t.min(burst));
        }
    }

    /// Many small refills add exactly what one over the span does: the state is one number and
    /// reads are pure, so there is no drift to accumulate; the refill rate is the limit's.
    #[test]
    fn refill_is_the_limits_rate(
        (burst, amount, period) in limit(),
        now in now_strategy(),
        later in 0_i64..100_000_000,
    ) {
        if burst == i64::MAX {
            return Ok(());
        }
        let empty = full_at_of(burst, amount, period, 0, now).unwrap();
        let got = i128::from(available(burst, amount, period, Some(empty), now + later).unwrap());
        let exact = (i128::from(later) * i128::from(amount) / i128::from(period)).min(i128::from(burst));
        prop_assert_eq!(got, exact);
    }

    #[test]
    fn decide_is_consistent(
        (now, buckets) in now_strategy()
            .prop_flat_map(|now| (Just(now), prop::collection::vec(valid_bucket(now), 1..5))),
        check in any::<bool>(),
        pick in any::<u64>(),
    ) {
        // with realistic limits nothing overflows; with burst = i64::MAX it may (e.g. a retry
        // far outside i64), which is then reported, never wrapped
        let extreme = buckets.iter().any(|b| b.burst_milli == i64::MAX);
        let decided = decide(&buckets, now, check);
        let wait = time_until_available(&buckets, now);
        if extreme && (decided.is_err() || wait.is_err()) {
            prop_assert!(decided.as_ref().err().is_none_or(|e| *e == CoreError::Overflow));
            prop_assert!(wait.as_ref().err().is_none_or(|e| *e == CoreError::Overflow));
            return Ok(());
        }
        let (admitted, outs) = decided.unwrap();
        let wait = wait.unwrap();
        prop_assert_eq!(outs.len(), buckets.len());
        let any_exceeded = outs.iter().any(|o| o.exceeded);
        prop_assert_eq!(admitted, !any_exceeded);
        if !check {
            prop_assert!(admitted);
        }
        if check {
            let expect = if outs.iter().any(|o| o.exceeded && o.retry_after_ms.is_none()) {
                None
            } else {
                Some(outs.iter().filter_map(|o| o.retry_after_ms).max().unwrap_or(0))
            };
            if buckets.iter().all(|b| b.delta_milli <= b.burst_milli) {
                prop_assert_eq!(wait, expect);
            } else {
                prop_assert_eq!(wait, None);
            }
        }
        for (b, o) in buckets.iter().zip(&outs) {
            if b.burst_milli == i64::MAX {
                // the rest reads states whose balance may leave i64 (covered by nothing_panics)
                continue;
            }
            let avail = avail_of(b, b.full_at, now);
            prop_assert_eq!(o.available_milli, avail);
            let over = check && b.delta_milli > 0 && avail < b.delta_milli;
            prop_assert_eq!(o.exceeded, over);
            // retry_after: the first ms at which the input state covers delta
            match (o.exceeded, o.retry_after_ms) {
                (false, r) => prop_assert_eq!(r, Some(0)),
                (true, None) => prop_assert!(b.delta_milli > b.burst_milli),
                (true, Some(r)) => {
                    prop_assert!(r > 0);
                    if let Some(at) = now.checked_add(r) {
                        prop_assert!(avail_of(b, b.full_at, at) >= b.delta_milli);
                        prop_assert!(avail_of(b, b.full_at, at - 1) < b.delta_milli);
                    }
                }
            }
            if !admitted || b.delta_milli == 0 {
                prop_assert_eq!(o.write_mode, WriteMode::None);
                prop_assert_eq!(o.new_full_at, b.full_at);
                prop_assert_eq!((o.cond_lo, o.cond_hi), (None, None));
                continue;
            }
            prop_assert!(o.write_mode != WriteMode::None);
            // the write applied to the input state gives the new state, which holds what it
            // held minus delta (capped at burst)
            prop_assert_eq!(apply(o, b.full_at), o.new_full_at);
            prop_assert_eq!(avail_of(b, o.new_full_at, now), minus_capped(avail, b));
            prop_assert!(holds(o, b.full_at, b.full_at));
            if b.full_at.is_none() {
                prop_assert_eq!(o.write_mode, WriteMode::Absolute);
                prop_assert_eq!((o.cond_lo, o.cond_hi), (None, None));
                continue;
            }
            // any other stored state satisfying the condition (concurrent writers) gets the
            // result a decision on that state would give: exact whatever the interleaving
            let f = b.full_at.unwrap();
            let reach = 3_000_000_000_000_i128;
            let lo = o.cond_lo.unwrap_or(f - reach).max(f - reach);
            let hi = o.cond_hi.unwrap_or(f + reach).min(f + reach);
            prop_assert!(lo <= hi);
            let span = u128::try_from(hi - lo).unwrap() + 1;
            let other = lo + i128::try_from(u128::from(pick) % span).unwrap();
            let other_avail = avail_of(b, Some(other), now);
            if check && b.delta_milli > 0 {
                prop_assert!(other_avail >= b.delta_milli);
            }
            let written = apply(o, Some(other));
            prop_assert_eq!(avail_of(b, written, now), minus_capped(other_avail, b));
            let (_, fresh) = decide(&[BucketInput { full_at: Some(other), ..*b }], now, check).unwrap();
            prop_assert_eq!(written, apply(&fresh[0], Some(other)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrent writers (docs/design.md, "Concurrent writers"): a simulated table applies a write
// only when its condition holds on the stored state, as DynamoDB does.

fn bucket_at(limit: (i64, i64, i64), full_at: Option<i128>, delta: i64) -> BucketInput {
    BucketInput {
        burst_milli: limit.0,
        refill_amount_milli: limit.1,
        refill_period_ms: limit.2,
        full_at,
        delta_milli: delta,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// Writers holding one stale view of a full (or half-full, or absent) bucket land in any
    /// order, each deciding at its own clock (which may lag the others'): every applied write
    /// has the effect of a decision made on the stored state at that writer's now, nothing is
    /// denied, and no writer conflicts more than twice.
    #[test]
    fn racing_writers_are_exact_and_conflict_boundedly(
        limit in prop_oneof![
            Just((10_000_000_000_i64, 10_000_000_000_i64, 86_400_000_i64)),
            Just((100_000, 100_000, 60_000)),
            Just((1_000_000, 100_000_000, 60_000)),
        ],
        fill in 0_u8..3,
        writes in prop::collection::vec((1_i64..800, any::<bool>(), 0_i64..3), 2..60),
    ) {
        let now0 = 1_800_000_000_000_i64;
        let start = match fill {
            0 => None,
            1 => Some(full_at_of(limit.0, limit.1, limit.2, limit.0, now0 - 600_000).unwrap()),
            _ => Some(full_at_of(limit.0, limit.1, limit.2, limit.0 / 2, now0).unwrap()),
        };
        let mut table = start;
        let mut now = now0;
        for (delta, check, advance) in writes {
            now += advance;
            let mut view = start;
            let mut conflicts = 0;
            loop {
                let (admitted, outs) = decide(&[bucket_at(limit, view, delta)], now, check).unwrap();
                prop_assert!(admitted, "denied on a bucket far from empty");
                let o = outs[0];
                if !holds(&o, table, view) {
                    conflicts += 1;
                    prop_assert!(conflicts <= 2, "a writer conflicted three times");
                    view = table;
                    continue;
                }
                let (_, fresh) = decide(&[bucket_at(limit, table, delta)], now, check).unwrap();
                prop_assert_eq!(apply(&o, table), apply(&fresh[0], table));
                table = apply(&o, table);
                break;
            }
        }
    }
}
