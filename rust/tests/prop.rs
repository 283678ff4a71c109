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
    available, decide, refill, time_until_available, BucketInput, CoreError, Outcome, WriteMode,
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

fn any_opt_i64() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![Just(None), any_i64().prop_map(Some)]
}

fn any_bucket() -> impl Strategy<Value = BucketInput> {
    (
        any_i64(),
        any_i64(),
        any_i64(),
        any_opt_i64(),
        any_opt_i64(),
        any_i64(),
    )
        .prop_map(
            |(
                burst_milli,
                refill_amount_milli,
                refill_period_ms,
                tokens_milli,
                last_refill_ms,
                d,
            )| {
                BucketInput {
                    burst_milli,
                    refill_amount_milli,
                    refill_period_ms,
                    tokens_milli,
                    last_refill_ms,
                    delta_milli: d,
                }
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
        -100_000_i64..=100_000,
        0_u8..4,
    )
        .prop_flat_map(move |((burst, amount, period), exists, t, back, dkind)| {
            let tokens = if exists { Some(t.min(burst)) } else { None };
            let last = if exists { Some(now - back * 7) } else { None };
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
                tokens_milli: tokens,
                last_refill_ms: last,
                delta_milli,
            })
        })
}

fn now_strategy() -> impl Strategy<Value = i64> {
    1_000_000_i64..=4_000_000_000_000
}

fn avail_of(b: &BucketInput, tokens: Option<i64>, last: Option<i64>, now: i64) -> i64 {
    available(
        b.burst_milli,
        b.refill_amount_milli,
        b.refill_period_ms,
        tokens,
        last,
        now,
    )
    .unwrap()
}

/// `min(burst, avail - delta)`, exactly.
fn minus_capped(avail: i64, b: &BucketInput) -> i64 {
    let v = (i128::from(avail) - i128::from(b.delta_milli)).min(i128::from(b.burst_milli));
    i64::try_from(v).unwrap()
}

/// Apply an outcome's write to a stored state `(tokens, last)` (None: tokens leave i64).
fn apply(o: &Outcome, tokens: i64) -> Option<(i64, i64)> {
    match o.write_mode {
        WriteMode::Relative | WriteMode::Add => {
            Some((tokens.checked_add(o.write_value)?, o.new_last_refill_ms))
        }
        WriteMode::Absolute => Some((o.write_value, o.new_last_refill_ms)),
        WriteMode::None => panic!("no write"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn nothing_panics(
        buckets in prop::collection::vec(any_bucket(), 0..5),
        now in any_i64(),
        reanchor in any_i64(),
        check in any::<bool>(),
        b in any_bucket(),
    ) {
        let _ = decide(&buckets, now, check, reanchor);
        let _ = time_until_available(&buckets, now);
        let _ = available(
            b.burst_milli, b.refill_amount_milli, b.refill_period_ms,
            b.tokens_milli, b.last_refill_ms, now,
        );
        let _ = refill(
            b.burst_milli, b.refill_amount_milli, b.refill_period_ms,
            b.tokens_milli.unwrap_or(0), b.last_refill_ms.unwrap_or(0), now,
        );
    }

    #[test]
    fn errors_are_classified(b in any_bucket(), now in any_i64()) {
        let r = available(
            b.burst_milli, b.refill_amount_milli, b.refill_period_ms,
            b.tokens_milli, b.last_refill_ms, now,
        );
        let invalid = b.burst_milli <= 0 || b.refill_amount_milli <= 0
            || b.refill_period_ms <= 0 || b.tokens_milli.is_some() != b.last_refill_ms.is_some()
            || now < 0;
        prop_assert_eq!(matches!(r, Err(CoreError::Invalid(_))), invalid);
        // available never overflows on valid input, and is capped at burst
        if let Ok(a) = r {
            prop_assert!(a <= b.burst_milli);
        }
    }

    #[test]
    fn refill_never_exceeds_burst(b in any_bucket(), t in any_i64(), l in any_i64(), now in any_i64()) {
        if let Ok((tokens, last)) =
            refill(b.burst_milli, b.refill_amount_milli, b.refill_period_ms, t, l, now)
        {
            prop_assert!(tokens <= b.burst_milli);
            prop_assert!(tokens >= t.min(b.burst_milli));
            // the anchor moves forward by whole quanta, or to now when capped
            prop_assert!(last == now || (last >= l && last <= now.max(l)));
            // the refilled state has the same availability
            prop_assert_eq!(
                available(b.burst_milli, b.refill_amount_milli, b.refill_period_ms,
                          Some(tokens), Some(last), now).unwrap(),
                available(b.burst_milli, b.refill_amount_milli, b.refill_period_ms,
                          Some(t), Some(l), now).unwrap()
            );
        }
    }

    #[test]
    fn refill_has_no_drift(
        (burst, amount, period) in limit(),
        t in -1_000_000_000_i64..1_000_000_000,
        l in 0_i64..10_000_000,
        steps in prop::collection::vec(0_i64..100_000, 1..20),
    ) {
        let t = t.min(burst - 1);
        let end = l + steps.iter().sum::<i64>();
        let once = refill(burst, amount, period, t, l, end).unwrap();
        if once.0 < burst {
            // not capped over the whole span: many small refills add exactly the same
            let (mut tokens, mut last, mut now) = (t, l, l);
            for s in &steps {
                now += s;
                (tokens, last) = refill(burst, amount, period, tokens, last, now).unwrap();
            }
            prop_assert_eq!((tokens, last), once);
        }
    }

    #[test]
    fn decide_is_consistent(
        (now, buckets) in now_strategy()
            .prop_flat_map(|now| (Just(now), prop::collection::vec(valid_bucket(now), 1..5))),
        check in any::<bool>(),
        reanchor in prop_oneof![Just(0_i64), 0_i64..100_000],
        pick in any::<u64>(),
    ) {
        // with realistic limits nothing overflows; with burst = i64::MAX it may (e.g. a retry
        // or a forced write far outside i64), which is then reported, never wrapped
        let extreme = buckets.iter().any(|b| b.burst_milli == i64::MAX);
        let decided = decide(&buckets, now, check, reanchor);
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
        // all-or-nothing
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
            let avail = avail_of(b, b.tokens_milli, b.last_refill_ms, now);
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
                        let (t, l) = (b.tokens_milli, b.last_refill_ms);
                        prop_assert!(avail_of(b, t, l, at) >= b.delta_milli);
                        prop_assert!(avail_of(b, t, l, at - 1) < b.delta_milli);
                    }
                }
            }
            let input_state = (
                b.tokens_milli.unwrap_or(b.burst_milli),
                b.last_refill_ms.unwrap_or(now),
            );
            if !admitted || b.delta_milli == 0 {
                prop_assert_eq!(o.write_mode, WriteMode::None);
                prop_assert_eq!((o.new_tokens_milli, o.new_last_refill_ms), input_state);
                prop_assert_eq!((o.cond_lo, o.cond_hi), (None, None));
                continue;
            }
            prop_assert!(o.write_mode != WriteMode::None);
            // the write applied to the input state gives the new state
            let new_state = (o.new_tokens_milli, o.new_last_refill_ms);
            prop_assert_eq!(apply(o, input_state.0), Some(new_state));
            // which has the expected availability
            let after = avail_of(b, Some(o.new_tokens_milli), Some(o.new_last_refill_ms), now);
            prop_assert_eq!(after, minus_capped(avail, b));
            if b.tokens_milli.is_none() {
                prop_assert_eq!(o.write_mode, WriteMode::Absolute);
                prop_assert_eq!((o.cond_lo, o.cond_hi), (None, None));
                continue;
            }
            // the input state satisfies its own condition
            let t = input_state.0;
            prop_assert!(o.cond_lo.is_none_or(|lo| t >= lo));
            prop_assert!(o.cond_hi.is_none_or(|hi| t <= hi));
            // any other stored state satisfying the condition (same anchor, concurrent writers)
            // gets a correct result from the same write
            let (near_lo, near_hi) = (t.saturating_sub(3_000_000_000), t.saturating_add(3_000_000_000));
            let lo = o.cond_lo.unwrap_or(near_lo).max(near_lo);
            let hi = o.cond_hi.unwrap_or(near_hi).min(near_hi);
            prop_assert!(lo <= hi);
            let span = u64::try_from(hi - lo).unwrap() + 1;
            let other = lo + i64::try_from(pick % span).unwrap();
            let other_avail = avail_of(b, Some(other), b.last_refill_ms, now);
            if check && b.delta_milli > 0 {
                prop_assert!(other_avail >= b.delta_milli);
            }
            if let Some((nt, nl)) = apply(o, other) {
                prop_assert_eq!(avail_of(b, Some(nt), Some(nl), now), minus_capped(other_avail, b));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Concurrent writers (docs/design.md, "Concurrent writers"): a simulated table applies a write
// only when its condition holds on the stored state, as DynamoDB does.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stored {
    tokens: Option<i64>,
    last: Option<i64>,
}

fn holds(o: &Outcome, s: &Stored, expect_last: Option<i64>) -> bool {
    if o.write_mode == WriteMode::Add {
        return true;
    }
    match expect_last {
        None => s.last.is_none(),
        Some(l) => {
            s.last == Some(l)
                && s.tokens.is_some_and(|t| {
                    o.cond_lo.is_none_or(|lo| t >= lo) && o.cond_hi.is_none_or(|hi| t <= hi)
                })
        }
    }
}

fn store(o: &Outcome, s: &Stored) -> Stored {
    match o.write_mode {
        WriteMode::None => *s,
        WriteMode::Absolute => Stored {
            tokens: Some(o.write_value),
            last: Some(o.new_last_refill_ms),
        },
        WriteMode::Add => Stored {
            tokens: Some(s.tokens.unwrap_or(0) + o.write_value),
            last: s.last,
        },
        WriteMode::Relative => Stored {
            tokens: Some(s.tokens.unwrap() + o.write_value),
            last: Some(o.new_last_refill_ms),
        },
    }
}

fn bucket_at(limit: (i64, i64, i64), s: &Stored, delta: i64) -> BucketInput {
    BucketInput {
        burst_milli: limit.0,
        refill_amount_milli: limit.1,
        refill_period_ms: limit.2,
        tokens_milli: s.tokens,
        last_refill_ms: s.last,
        delta_milli: delta,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    /// Writers holding one stale view of a full (or half-full, or absent) bucket land in any
    /// order within one epoch: every applied write has the effect of a decision made on the
    /// stored state, nothing is denied, no writer conflicts twice, and the bucket never offers
    /// more than burst minus what was taken.
    #[test]
    fn racing_writers_are_exact_and_conflict_at_most_once(
        limit in prop_oneof![
            Just((10_000_000_000_i64, 10_000_000_000_i64, 86_400_000_i64)),
            Just((100_000, 100_000, 60_000)),
        ],
        fill in 0_u8..3,
        writes in prop::collection::vec((1_i64..800, any::<bool>(), 0_i64..3), 2..60),
    ) {
        let now0 = 1_800_000_000_000_i64;
        let reanchor = 60_000;
        let start = match fill {
            0 => Stored { tokens: None, last: None },
            1 => Stored { tokens: Some(limit.0), last: Some(now0 - 600_000) },
            _ => Stored { tokens: Some(limit.0 / 2), last: Some(now0 - 600_000) },
        };
        let mut table = start;
        let mut now = now0;
        let mut taken = 0_i64;
        for (delta, check, advance) in writes {
            now += advance;
            let mut view = start;
            let mut conflicts = 0;
            loop {
                let (admitted, outs) = decide(&[bucket_at(limit, &view, delta)], now, check, reanchor).unwrap();
                prop_assert!(admitted, "denied on a bucket far from empty");
                let o = outs[0];
                if !holds(&o, &table, view.last) {
                    conflicts += 1;
                    prop_assert!(conflicts <= 1, "a writer conflicted twice");
                    view = table;
                    continue;
                }
                let (_, fresh) = decide(&[bucket_at(limit, &table, delta)], now, check, reanchor).unwrap();
                prop_assert_eq!(store(&o, &table), store(&fresh[0], &table));
                table = store(&o, &table);
                taken += delta;
                break;
            }
            let offered = available(limit.0, limit.1, limit.2, table.tokens, table.last, now).unwrap();
            let before = available(limit.0, limit.1, limit.2, start.tokens, start.last, now).unwrap();
            prop_assert!(offered <= before - taken + (now - now0) * limit.1 / limit.2 + limit.1 / limit.2);
        }
    }
}
