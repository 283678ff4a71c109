//! Reserved blocks: tokens a process took from a shared bucket item and now spends locally.
//!
//! A [`Block`] holds, per limit of one bucket item, millitokens already consumed from the shared
//! bucket with a conditional write. Spending them needs no I/O and cannot over-admit: whatever a
//! block hands out, the shared bucket granted first. `docs/design.md` ("Reservations") gives the
//! policy around it; this module is only the arithmetic, checked like the bucket math: nothing
//! here panics and no value wraps.
#![forbid(unsafe_code)]

use crate::bucket::{CoreError, CoreResult};

/// Tokens held for the limits of one bucket item, and how many were spent since the last look.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Block {
    held: Vec<i64>,
    spent: Vec<i64>,
}

fn invalid(msg: &str) -> CoreError {
    CoreError::Invalid(msg.to_owned())
}

impl Block {
    /// An empty block for `limits` limits.
    pub fn new(limits: usize) -> Block {
        Block {
            held: vec![0; limits],
            spent: vec![0; limits],
        }
    }

    /// Millitokens held per limit.
    pub fn held(&self) -> &[i64] {
        &self.held
    }

    /// Millitokens spent per limit since the block was created or [`Block::take_spent`] was called.
    pub fn spent(&self) -> &[i64] {
        &self.spent
    }

    fn check(&self, amounts: &[i64]) -> CoreResult<()> {
        if amounts.len() != self.held.len() {
            return Err(invalid(
                "amounts must give one value per limit of the block",
            ));
        }
        if amounts.iter().any(|&a| a < 0) {
            return Err(invalid("amounts must not be negative"));
        }
        Ok(())
    }

    /// Whether every limit holds at least its amount (amounts already checked).
    fn covers(&self, amounts: &[i64]) -> bool {
        self.held.iter().zip(amounts).all(|(&h, &a)| h >= a)
    }

    fn spend(&mut self, amounts: &[i64]) -> CoreResult<()> {
        let mut spent = self.spent.clone();
        for (s, &a) in spent.iter_mut().zip(amounts) {
            *s = s.checked_add(a).ok_or(CoreError::Overflow)?;
        }
        let mut held = self.held.clone();
        for (h, &a) in held.iter_mut().zip(amounts) {
            *h = h.checked_sub(a).ok_or(CoreError::Overflow)?;
        }
        self.held = held;
        self.spent = spent;
        Ok(())
    }

    /// Add reserved (or given back) millitokens to the block.
    pub fn add(&mut self, amounts: &[i64]) -> CoreResult<()> {
        self.check(amounts)?;
        let mut held = self.held.clone();
        for (h, &a) in held.iter_mut().zip(amounts) {
            *h = h.checked_add(a).ok_or(CoreError::Overflow)?;
        }
        self.held = held;
        Ok(())
    }

    /// Take `amounts` if the block covers all of them; otherwise take nothing.
    pub fn take(&mut self, amounts: &[i64]) -> CoreResult<bool> {
        self.check(amounts)?;
        if !self.covers(amounts) {
            return Ok(false);
        }
        self.spend(amounts)?;
        Ok(true)
    }

    /// Take as much of `amounts` as the block holds, per limit; returns what it could not cover.
    pub fn take_up_to(&mut self, amounts: &[i64]) -> CoreResult<Vec<i64>> {
        self.check(amounts)?;
        let covered: Vec<i64> = self
            .held
            .iter()
            .zip(amounts)
            .map(|(&h, &a)| a.min(h.max(0)))
            .collect();
        self.spend(&covered)?;
        amounts
            .iter()
            .zip(&covered)
            .map(|(&a, &c)| a.checked_sub(c).ok_or(CoreError::Overflow))
            .collect()
    }

    /// Empty the block; returns what it held.
    pub fn drain(&mut self) -> Vec<i64> {
        let n = self.held.len();
        std::mem::replace(&mut self.held, vec![0; n])
    }

    /// What was spent since the last call (or creation), and start counting again.
    pub fn take_spent(&mut self) -> Vec<i64> {
        let n = self.spent.len();
        std::mem::replace(&mut self.spent, vec![0; n])
    }
}

/// All or nothing over several blocks (an entity's and its parent's): take `amounts[i]` from
/// `blocks[i]` if every block covers its amounts; otherwise take nothing from any.
pub fn take_all(blocks: &mut [&mut Block], amounts: &[&[i64]]) -> CoreResult<bool> {
    if blocks.len() != amounts.len() {
        return Err(invalid("take_all needs one amounts list per block"));
    }
    for (block, a) in blocks.iter().zip(amounts) {
        block.check(a)?;
    }
    if !blocks.iter().zip(amounts).all(|(b, a)| b.covers(a)) {
        return Ok(false);
    }
    // Spend on copies first, so that an overflow in any block leaves every block untouched.
    let mut spent: Vec<Block> = Vec::with_capacity(blocks.len());
    for (block, a) in blocks.iter().zip(amounts) {
        let mut copy = (**block).clone();
        copy.spend(a)?;
        spent.push(copy);
    }
    for (block, copy) in blocks.iter_mut().zip(spent) {
        **block = copy;
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn take_is_all_or_nothing_within_a_block() {
        let mut b = Block::new(2);
        b.add(&[3000, 500]).unwrap();
        assert!(!b.take(&[1000, 600]).unwrap());
        assert_eq!(b.held(), &[3000, 500]);
        assert!(b.take(&[1000, 500]).unwrap());
        assert_eq!(b.held(), &[2000, 0]);
        assert_eq!(b.spent(), &[1000, 500]);
    }

    #[test]
    fn take_all_is_all_or_nothing_across_blocks() {
        let mut a = Block::new(1);
        let mut p = Block::new(1);
        a.add(&[5]).unwrap();
        p.add(&[1]).unwrap();
        assert!(!take_all(&mut [&mut a, &mut p], &[&[2], &[2]]).unwrap());
        assert_eq!((a.held(), p.held()), (&[5][..], &[1][..]));
        assert!(take_all(&mut [&mut a, &mut p], &[&[2], &[1]]).unwrap());
        assert_eq!((a.held(), p.held()), (&[3][..], &[0][..]));
    }

    #[test]
    fn take_up_to_returns_the_uncovered_rest() {
        let mut b = Block::new(2);
        b.add(&[300, 0]).unwrap();
        assert_eq!(b.take_up_to(&[500, 7]).unwrap(), vec![200, 7]);
        assert_eq!(b.held(), &[0, 0]);
        assert_eq!(b.take_spent(), vec![300, 0]);
        assert_eq!(b.spent(), &[0, 0]);
    }

    #[test]
    fn bad_amounts_are_errors_and_change_nothing() {
        let mut b = Block::new(2);
        b.add(&[10, 10]).unwrap();
        assert!(matches!(b.take(&[1]), Err(CoreError::Invalid(_))));
        assert!(matches!(b.take(&[-1, 0]), Err(CoreError::Invalid(_))));
        assert!(matches!(b.add(&[i64::MAX, 0]), Err(CoreError::Overflow)));
        assert!(matches!(
            take_all(&mut [&mut b], &[]),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(b.held(), &[10, 10]);
    }

    #[test]
    fn drain_empties() {
        let mut b = Block::new(1);
        b.add(&[42]).unwrap();
        assert_eq!(b.drain(), vec![42]);
        assert_eq!(b.held(), &[0]);
    }
}
