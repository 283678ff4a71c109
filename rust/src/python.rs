//! The thin PyO3 layer: `zae_limiter._native`.
//!
//! Arguments are converted in signature order (buckets field by field first). Conversion
//! failures raise `TypeError` (wrong type; `bool` is not accepted as an integer, and `check`
//! must be a `bool`) or `OverflowError` (an int outside signed 64-bit, or a `full_at` beyond
//! `FULL_AT_MAX`); then the core validates
//! (`ValueError`) and computes (`OverflowError`). The pure-Python reference
//! `zae_limiter.bucket` follows the same order, so both raise the same exception types.

use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyList, PyTuple};

use crate::block::{self, Block};
use crate::bucket::{self, BucketInput, CoreError, Outcome, FULL_AT_MAX};

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        match e {
            CoreError::Invalid(msg) => PyValueError::new_err(msg),
            CoreError::Overflow => PyOverflowError::new_err(CoreError::Overflow.to_string()),
        }
    }
}

/// An int (or an object with `__index__`) that fits i64; `bool` is rejected.
fn int(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int, not bool"
        )));
    }
    obj.extract::<i64>()
}

/// A bucket's `full_at`: None, or an int within a DynamoDB number (`|v| <= FULL_AT_MAX`).
fn opt_full_at(obj: &Bound<'_, PyAny>) -> PyResult<Option<i128>> {
    if obj.is_none() {
        return Ok(None);
    }
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err("full_at must be an int, not bool"));
    }
    let v = obj.extract::<i128>()?;
    if (-FULL_AT_MAX..=FULL_AT_MAX).contains(&v) {
        Ok(Some(v))
    } else {
        Err(PyOverflowError::new_err(format!(
            "full_at does not fit a DynamoDB number: {v}"
        )))
    }
}

fn flag(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<bool> {
    match obj.cast::<PyBool>() {
        Ok(b) => Ok(b.is_true()),
        Err(_) => Err(PyTypeError::new_err(format!("{name} must be a bool"))),
    }
}

fn bucket_input(obj: &Bound<'_, PyAny>) -> PyResult<BucketInput> {
    let t = obj
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("a bucket must be a tuple of 5 items"))?;
    if t.len() != 5 {
        return Err(PyTypeError::new_err(format!(
            "a bucket must be a tuple of 5 items, got {}",
            t.len()
        )));
    }
    Ok(BucketInput {
        burst_milli: int(&*t.get_borrowed_item(0)?, "burst_milli")?,
        refill_amount_milli: int(&*t.get_borrowed_item(1)?, "refill_amount_milli")?,
        refill_period_ms: int(&*t.get_borrowed_item(2)?, "refill_period_ms")?,
        full_at: opt_full_at(&*t.get_borrowed_item(3)?)?,
        delta_milli: int(&*t.get_borrowed_item(4)?, "delta_milli")?,
    })
}

/// `buckets` must be a list or a tuple of bucket tuples.
fn bucket_inputs(obj: &Bound<'_, PyAny>) -> PyResult<Vec<BucketInput>> {
    if let Ok(list) = obj.cast::<PyList>() {
        let mut v = Vec::with_capacity(list.len());
        for item in list.iter() {
            v.push(bucket_input(&item)?);
        }
        Ok(v)
    } else if let Ok(tuple) = obj.cast::<PyTuple>() {
        let mut v = Vec::with_capacity(tuple.len());
        for item in tuple.iter() {
            v.push(bucket_input(&item)?);
        }
        Ok(v)
    } else {
        Err(PyTypeError::new_err(
            "buckets must be a list or a tuple of bucket tuples",
        ))
    }
}

/// One bucket's outcome of a decision (`docs/design.md` section 1), read by attribute.
#[pyclass(frozen, eq, name = "Outcome", module = "zae_limiter._native")]
#[derive(PartialEq, Eq)]
struct PyOutcome {
    #[pyo3(get)]
    available_milli: i64,
    #[pyo3(get)]
    exceeded: bool,
    #[pyo3(get)]
    retry_after_ms: Option<i64>,
    #[pyo3(get)]
    write_mode: i64,
    #[pyo3(get)]
    write_value: i128,
    #[pyo3(get)]
    new_full_at: Option<i128>,
    #[pyo3(get)]
    cond_lo: Option<i128>,
    #[pyo3(get)]
    cond_hi: Option<i128>,
}

#[pymethods]
impl PyOutcome {
    fn __repr__(&self) -> String {
        fn opt<T: ToString>(v: Option<T>) -> String {
            v.map_or_else(|| "None".to_owned(), |v| v.to_string())
        }
        format!(
            "Outcome(available_milli={}, exceeded={}, retry_after_ms={}, write_mode={}, \
             write_value={}, new_full_at={}, cond_lo={}, cond_hi={})",
            self.available_milli,
            if self.exceeded { "True" } else { "False" },
            opt(self.retry_after_ms),
            self.write_mode,
            self.write_value,
            opt(self.new_full_at),
            opt(self.cond_lo),
            opt(self.cond_hi),
        )
    }
}

impl From<&Outcome> for PyOutcome {
    fn from(o: &Outcome) -> Self {
        PyOutcome {
            available_milli: o.available_milli,
            exceeded: o.exceeded,
            retry_after_ms: o.retry_after_ms,
            write_mode: o.write_mode.code(),
            write_value: o.write_value,
            new_full_at: o.new_full_at,
            cond_lo: o.cond_lo,
            cond_hi: o.cond_hi,
        }
    }
}

/// decide(buckets, now_ms, check) -> (admitted, outcomes)
#[pyfunction]
#[pyo3(signature = (buckets, now_ms, check))]
fn decide<'py>(
    py: Python<'py>,
    buckets: &Bound<'py, PyAny>,
    now_ms: &Bound<'py, PyAny>,
    check: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let inputs = bucket_inputs(buckets)?;
    let now_ms = int(now_ms, "now_ms")?;
    let check = flag(check, "check")?;
    let (admitted, outcomes) = bucket::decide(&inputs, now_ms, check)?;
    let list = PyList::new(py, outcomes.iter().map(PyOutcome::from))?;
    (admitted, list).into_pyobject(py)
}

/// time_until_available(buckets, now_ms) -> int | None
#[pyfunction]
#[pyo3(signature = (buckets, now_ms))]
fn time_until_available(
    buckets: &Bound<'_, PyAny>,
    now_ms: &Bound<'_, PyAny>,
) -> PyResult<Option<i64>> {
    let inputs = bucket_inputs(buckets)?;
    let now_ms = int(now_ms, "now_ms")?;
    Ok(bucket::time_until_available(&inputs, now_ms)?)
}

/// available(burst_milli, refill_amount_milli, refill_period_ms, full_at, now_ms) -> int
#[pyfunction]
#[pyo3(signature = (burst_milli, refill_amount_milli, refill_period_ms, full_at, now_ms))]
fn available(
    burst_milli: &Bound<'_, PyAny>,
    refill_amount_milli: &Bound<'_, PyAny>,
    refill_period_ms: &Bound<'_, PyAny>,
    full_at: &Bound<'_, PyAny>,
    now_ms: &Bound<'_, PyAny>,
) -> PyResult<i64> {
    Ok(bucket::available(
        int(burst_milli, "burst_milli")?,
        int(refill_amount_milli, "refill_amount_milli")?,
        int(refill_period_ms, "refill_period_ms")?,
        opt_full_at(full_at)?,
        int(now_ms, "now_ms")?,
    )?)
}

/// full_at_of(burst_milli, refill_amount_milli, refill_period_ms, tokens_milli, now_ms) -> int
#[pyfunction]
#[pyo3(signature = (burst_milli, refill_amount_milli, refill_period_ms, tokens_milli, now_ms))]
fn full_at_of(
    burst_milli: &Bound<'_, PyAny>,
    refill_amount_milli: &Bound<'_, PyAny>,
    refill_period_ms: &Bound<'_, PyAny>,
    tokens_milli: &Bound<'_, PyAny>,
    now_ms: &Bound<'_, PyAny>,
) -> PyResult<i128> {
    Ok(bucket::full_at_of(
        int(burst_milli, "burst_milli")?,
        int(refill_amount_milli, "refill_amount_milli")?,
        int(refill_period_ms, "refill_period_ms")?,
        int(tokens_milli, "tokens_milli")?,
        int(now_ms, "now_ms")?,
    )?)
}

/// Amounts per limit: a list or tuple of ints (each converted like any other int).
fn int_list(obj: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    let items: Vec<Bound<'_, PyAny>> = if let Ok(list) = obj.cast::<PyList>() {
        list.iter().collect()
    } else if let Ok(tuple) = obj.cast::<PyTuple>() {
        tuple.iter().collect()
    } else {
        return Err(PyTypeError::new_err(
            "amounts must be a list or a tuple of ints",
        ));
    };
    items.iter().map(|item| int(item, "amount")).collect()
}

/// Tokens reserved from one bucket item, per limit (`zae_limiter.bucket.Block` is the twin).
#[pyclass(name = "Block", module = "zae_limiter._native")]
struct PyBlock {
    inner: Block,
}

#[pymethods]
impl PyBlock {
    #[new]
    fn new(limits: &Bound<'_, PyAny>) -> PyResult<Self> {
        let n = int(limits, "limits")?;
        let n =
            usize::try_from(n).map_err(|_| PyValueError::new_err("limits must not be negative"))?;
        Ok(PyBlock {
            inner: Block::new(n),
        })
    }

    #[getter]
    fn held(&self) -> Vec<i64> {
        self.inner.held().to_vec()
    }

    #[getter]
    fn spent(&self) -> Vec<i64> {
        self.inner.spent().to_vec()
    }

    fn add(&mut self, amounts: &Bound<'_, PyAny>) -> PyResult<()> {
        Ok(self.inner.add(&int_list(amounts)?)?)
    }

    fn take(&mut self, amounts: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(self.inner.take(&int_list(amounts)?)?)
    }

    fn take_up_to(&mut self, amounts: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
        Ok(self.inner.take_up_to(&int_list(amounts)?)?)
    }

    fn drain(&mut self) -> Vec<i64> {
        self.inner.drain()
    }

    fn take_spent(&mut self) -> Vec<i64> {
        self.inner.take_spent()
    }

    fn __repr__(&self) -> String {
        format!(
            "Block(held={:?}, spent={:?})",
            self.inner.held(),
            self.inner.spent()
        )
    }
}

/// take_all(blocks, amounts) -> bool: all or nothing over several distinct blocks.
#[pyfunction]
#[pyo3(signature = (blocks, amounts))]
fn take_all(blocks: &Bound<'_, PyAny>, amounts: &Bound<'_, PyAny>) -> PyResult<bool> {
    let blocks: Vec<Bound<'_, PyBlock>> = if let Ok(list) = blocks.cast::<PyList>() {
        list.iter()
            .map(|b| b.cast_into::<PyBlock>().map_err(PyErr::from))
            .collect::<PyResult<_>>()?
    } else if let Ok(tuple) = blocks.cast::<PyTuple>() {
        tuple
            .iter()
            .map(|b| b.cast_into::<PyBlock>().map_err(PyErr::from))
            .collect::<PyResult<_>>()?
    } else {
        return Err(PyTypeError::new_err(
            "blocks must be a list or a tuple of Block",
        ));
    };
    let lists: Vec<Vec<i64>> = if let Ok(list) = amounts.cast::<PyList>() {
        list.iter().map(|a| int_list(&a)).collect::<PyResult<_>>()?
    } else if let Ok(tuple) = amounts.cast::<PyTuple>() {
        tuple
            .iter()
            .map(|a| int_list(&a))
            .collect::<PyResult<_>>()?
    } else {
        return Err(PyTypeError::new_err(
            "amounts must be a list or a tuple of lists",
        ));
    };
    // Borrowing one block twice would fail inside PyO3; say what is wrong instead.
    for (i, a) in blocks.iter().enumerate() {
        if blocks.iter().skip(i.saturating_add(1)).any(|b| b.is(a)) {
            return Err(PyValueError::new_err("take_all needs distinct blocks"));
        }
    }
    let mut refs: Vec<PyRefMut<'_, PyBlock>> = blocks
        .iter()
        .map(|b| b.try_borrow_mut().map_err(PyErr::from))
        .collect::<PyResult<_>>()?;
    let mut inner: Vec<&mut Block> = refs.iter_mut().map(|r| &mut r.inner).collect();
    let slices: Vec<&[i64]> = lists.iter().map(Vec::as_slice).collect();
    Ok(block::take_all(&mut inner, &slices)?)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyOutcome>()?;
    m.add_class::<PyBlock>()?;
    m.add_function(wrap_pyfunction!(take_all, m)?)?;
    m.add_function(wrap_pyfunction!(decide, m)?)?;
    m.add_function(wrap_pyfunction!(full_at_of, m)?)?;
    m.add_function(wrap_pyfunction!(available, m)?)?;
    m.add_function(wrap_pyfunction!(time_until_available, m)?)?;
    Ok(())
}
