//! A growable buffer of fixed-stride rows that never leaves copies behind.
//!
//! `Vec::push` may reallocate, and the allocator then frees the old block with
//! its contents intact: a vector erased later would still sit in freed heap
//! memory. `RowBuf` therefore manages its capacity itself: on every
//! reallocation the old block is zeroised (volatile writes, via `zeroize`)
//! before it is freed, a removed row is overwritten in place, the vacated tail
//! row is zeroised, and the whole block is zeroised on drop. Rows start on a
//! 64-byte boundary (the stride is a multiple of 16 floats) so SIMD loads never
//! straddle cache lines.

use zeroize::{DefaultIsZeroes, Zeroize};

/// Floats per cache line; the `f32` stride is a multiple of it.
pub(crate) const LINE_FLOATS: usize = 16;
/// Bytes per cache line.
const LINE: usize = 64;

/// Rows of `stride` elements, contiguous, 64-byte aligned, zeroised when vacated.
///
/// Invariant: `raw.len() == off + cap * stride + slack` with every element
/// initialised (zero where no row lives); rows `0..rows` start at `off`.
#[derive(Debug)]
pub(crate) struct RowBuf<T: DefaultIsZeroes = f32> {
    raw: Vec<T>,
    off: usize,
    stride: usize,
    rows: usize,
    cap: usize,
}

impl<T: DefaultIsZeroes> RowBuf<T> {
    /// An empty buffer (no allocation) for rows of `stride` elements.
    pub(crate) fn new(stride: usize) -> Self {
        debug_assert!(stride > 0 && (stride * std::mem::size_of::<T>()) % LINE == 0);
        Self {
            raw: Vec::new(),
            off: 0,
            stride,
            rows: 0,
            cap: 0,
        }
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        self.rows
    }

    /// Row `r` (full stride, padding included).
    pub(crate) fn row(&self, r: usize) -> &[T] {
        let start = self.off + r * self.stride;
        &self.raw[start..start + self.stride]
    }

    /// Rows `start..end` as one contiguous slice.
    pub(crate) fn rows(&self, start: usize, end: usize) -> &[T] {
        &self.raw[self.off + start * self.stride..self.off + end * self.stride]
    }

    /// Bytes held by the allocation.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.raw.capacity() * std::mem::size_of::<T>()
    }

    /// Appends a row; `row.len()` must equal the stride.
    pub(crate) fn push(&mut self, row: &[T]) {
        debug_assert_eq!(row.len(), self.stride);
        if self.rows == self.cap {
            let new_cap = (self.cap * 2).max(8);
            self.reallocate(new_cap);
        }
        let start = self.off + self.rows * self.stride;
        self.raw[start..start + self.stride].copy_from_slice(row);
        self.rows += 1;
    }

    /// Copies row `from` over row `to` (the old content of `to` is overwritten).
    pub(crate) fn copy_row(&mut self, from: usize, to: usize) {
        if from == to {
            return;
        }
        let src = self.off + from * self.stride;
        let dst = self.off + to * self.stride;
        self.raw.copy_within(src..src + self.stride, dst);
    }

    /// Zeroises and drops the last row; may shrink (zeroising the old block).
    pub(crate) fn pop_zeroed(&mut self) {
        if self.rows == 0 {
            return;
        }
        self.rows -= 1;
        let start = self.off + self.rows * self.stride;
        self.raw[start..start + self.stride].zeroize();
        if self.rows == 0 {
            self.reallocate(0);
        } else if self.cap >= 64 && self.rows * 4 < self.cap {
            self.reallocate(self.cap / 2);
        }
    }

    /// Releases spare capacity (the old block is zeroised).
    pub(crate) fn shrink_to_fit(&mut self) {
        if self.cap > self.rows {
            self.reallocate(self.rows);
        }
    }

    /// Whether any `needle.len()`-float window of the whole allocation
    /// (spare capacity included) equals `needle` bit for bit.
    #[cfg(test)]
    pub(crate) fn block_contains(&self, needle: &[T]) -> bool
    where
        T: PartialEq,
    {
        !needle.is_empty() && self.raw.windows(needle.len()).any(|w| w == needle)
    }

    /// Reserves room for `additional` more rows.
    pub(crate) fn reserve(&mut self, additional: usize) {
        let need = self.rows + additional;
        if need > self.cap {
            self.reallocate(need.max(self.cap * 2));
        }
    }

    /// Moves the rows into a block with room for `cap` rows and zeroises the
    /// old block before it is freed.
    fn reallocate(&mut self, cap: usize) {
        debug_assert!(cap >= self.rows);
        let size = std::mem::size_of::<T>();
        let mut raw = if cap == 0 {
            Vec::new()
        } else {
            vec![T::default(); cap * self.stride + LINE / size]
        };
        let off = if raw.is_empty() {
            0
        } else {
            let mis = raw.as_ptr() as usize % LINE;
            if mis == 0 {
                0
            } else {
                (LINE - mis) / size
            }
        };
        let used = self.rows * self.stride;
        if used > 0 {
            raw[off..off + used].copy_from_slice(&self.raw[self.off..self.off + used]);
        }
        let mut old = std::mem::replace(&mut self.raw, raw);
        old.zeroize();
        self.off = off;
        self.cap = cap;
    }
}

impl<T: DefaultIsZeroes> Drop for RowBuf<T> {
    fn drop(&mut self) {
        self.raw.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: f32) -> Vec<f32> {
        vec![v; LINE_FLOATS]
    }

    #[test]
    fn byte_rows_are_aligned_too() {
        let mut b = RowBuf::<i8>::new(64);
        for i in 0..20i8 {
            b.push(&[i; 64]);
            assert_eq!(b.row(0).as_ptr() as usize % 64, 0);
        }
        assert_eq!(b.row(19)[63], 19);
        assert!(b.block_contains(&[7; 64]));
        b.copy_row(19, 7);
        b.pop_zeroed();
        assert!(!b.block_contains(&[7; 64]));
    }

    #[test]
    fn rows_are_aligned_and_survive_growth() {
        let mut b = RowBuf::<f32>::new(LINE_FLOATS);
        for i in 0..100 {
            b.push(&row(i as f32));
            assert_eq!(b.row(0).as_ptr() as usize % 64, 0);
        }
        for i in 0..100 {
            assert_eq!(b.row(i)[3], i as f32);
        }
        assert_eq!(b.rows(10, 12).len(), 2 * LINE_FLOATS);
    }

    #[test]
    fn copy_and_pop_keep_contents_consistent() {
        let mut b = RowBuf::<f32>::new(LINE_FLOATS);
        for i in 0..5 {
            b.push(&row(i as f32));
        }
        b.copy_row(4, 1);
        b.pop_zeroed();
        assert_eq!(b.len(), 4);
        let got: Vec<f32> = (0..4).map(|i| b.row(i)[0]).collect();
        assert_eq!(got, vec![0.0, 4.0, 2.0, 3.0]);
        // The vacated slot (old row 4) is zero in the backing block.
        let tail_start = b.off + 4 * b.stride;
        assert!(b.raw[tail_start..tail_start + b.stride]
            .iter()
            .all(|&x| x == 0.0));
        while b.len() > 0 {
            b.pop_zeroed();
        }
        assert_eq!(b.allocated_bytes(), 0);
    }
}
