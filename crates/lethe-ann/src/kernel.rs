//! Dot-product kernels, dispatched once per call to the best SIMD level.
//!
//! All scores in the crate come from one canonical accumulation order (two
//! interleaved vector accumulators per row, then a horizontal sum), whether a
//! row is scored alone ([`dot`]), four at a time ([`scan`], [`dots`]), on the
//! exact path or in the graph. The same (query, vector) pair therefore always
//! gets bit-identical scores on a given machine, which is what makes results
//! deterministic and lets tests compare paths key by key.
//!
//! The multi-row kernels keep eight independent FMA chains in flight, where a
//! single-accumulator kernel (simsimd's, for instance) is bound by FMA latency.
//! Dispatch goes through `pulp`, which detects AVX2+FMA at run time without
//! `unsafe` in this crate; other CPUs get a portable scalar path.

use pulp::{Arch, Simd, WithSimd};

/// Dot product of two equally long slices (canonical order).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    struct Op<'a>(&'a [f32], &'a [f32]);
    impl WithSimd for Op<'_> {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> f32 {
            dot1(s, self.0, self.1)
        }
    }
    Arch::new().dispatch(Op(a, b))
}

/// Scores `out.len()` contiguous rows of `stride` floats in `data` against `q`.
pub(crate) fn scan(q: &[f32], data: &[f32], stride: usize, out: &mut [f32]) {
    struct Op<'a> {
        q: &'a [f32],
        data: &'a [f32],
        stride: usize,
        out: &'a mut [f32],
    }
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) {
            let Op {
                q,
                data,
                stride,
                out,
            } = self;
            let n = out.len();
            let mut i = 0;
            while i + 4 <= n {
                let r = dot4(
                    s,
                    q,
                    &data[i * stride..(i + 1) * stride],
                    &data[(i + 1) * stride..(i + 2) * stride],
                    &data[(i + 2) * stride..(i + 3) * stride],
                    &data[(i + 3) * stride..(i + 4) * stride],
                );
                out[i..i + 4].copy_from_slice(&r);
                i += 4;
            }
            while i < n {
                out[i] = dot1(s, q, &data[i * stride..(i + 1) * stride]);
                i += 1;
            }
        }
    }
    debug_assert!(data.len() >= out.len() * stride);
    Arch::new().dispatch(Op {
        q,
        data,
        stride,
        out,
    });
}

/// Scores scattered rows against `q`: `out[i] = dot(q, rows[i])`.
pub(crate) fn dots(q: &[f32], rows: &[&[f32]], out: &mut [f32]) {
    struct Op<'a> {
        q: &'a [f32],
        rows: &'a [&'a [f32]],
        out: &'a mut [f32],
    }
    impl WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) {
            let Op { q, rows, out } = self;
            let mut i = 0;
            let n = rows.len().min(out.len());
            while i + 4 <= n {
                let r = dot4(s, q, rows[i], rows[i + 1], rows[i + 2], rows[i + 3]);
                out[i..i + 4].copy_from_slice(&r);
                i += 4;
            }
            while i < n {
                out[i] = dot1(s, q, rows[i]);
                i += 1;
            }
        }
    }
    Arch::new().dispatch(Op { q, rows, out });
}

/// Integer dot products of an `i16` query with contiguous `i8` rows:
/// `out[i] = Σ_j q[j] · row_i[j]`, exact (no rounding) on every path.
/// `q.len()` and the stride must be equal multiples of 16.
pub(crate) fn scan_i8(q: &[i16], data: &[i8], stride: usize, out: &mut [i32]) {
    debug_assert!(q.len() == stride && stride % 16 == 0 && data.len() >= out.len() * stride);
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        simd.vectorize(avx2::ScanI8 {
            simd,
            q,
            data,
            stride,
            out,
        });
        return;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let row = &data[i * stride..(i + 1) * stride];
        *o = q.iter().zip(row).map(|(&a, &b)| a as i32 * b as i32).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 integer kernel (sign-extend to i16, `vpmaddwd`, add), four rows
    //! at a time, through pulp's safe wrappers of the intrinsics.

    use core::arch::x86_64::__m256i;
    use pulp::x86::V3;
    use pulp::{cast, i16x16, i32x8, i8x16, NullaryFnOnce};

    pub(super) struct ScanI8<'a> {
        pub(super) simd: V3,
        pub(super) q: &'a [i16],
        pub(super) data: &'a [i8],
        pub(super) stride: usize,
        pub(super) out: &'a mut [i32],
    }

    #[inline(always)]
    fn add(simd: V3, a: i32x8, b: i32x8) -> i32x8 {
        cast(
            simd.avx2
                ._mm256_add_epi32(cast::<i32x8, __m256i>(a), cast::<i32x8, __m256i>(b)),
        )
    }

    #[inline(always)]
    fn hsum(a: i32x8) -> i32 {
        cast::<i32x8, [i32; 8]>(a)
            .iter()
            .fold(0i32, |s, &x| s.wrapping_add(x))
    }

    impl NullaryFnOnce for ScanI8<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let ScanI8 {
                simd,
                q,
                data,
                stride,
                out,
            } = self;
            let (qa, _) = pulp::as_arrays::<16, i16>(q);
            let n = out.len();
            let zero = simd.splat_i32x8(0);
            let mut i = 0;
            while i + 4 <= n {
                let (r0, _) = pulp::as_arrays::<16, i8>(&data[i * stride..(i + 1) * stride]);
                let (r1, _) = pulp::as_arrays::<16, i8>(&data[(i + 1) * stride..(i + 2) * stride]);
                let (r2, _) = pulp::as_arrays::<16, i8>(&data[(i + 2) * stride..(i + 3) * stride]);
                let (r3, _) = pulp::as_arrays::<16, i8>(&data[(i + 3) * stride..(i + 4) * stride]);
                let m = qa
                    .len()
                    .min(r0.len())
                    .min(r1.len())
                    .min(r2.len())
                    .min(r3.len());
                let (mut a0, mut a1, mut a2, mut a3) = (zero, zero, zero, zero);
                for j in 0..m {
                    let qv: i16x16 = cast(qa[j]);
                    let x0 = simd.convert_i8x16_to_i16x16(cast::<[i8; 16], i8x16>(r0[j]));
                    let x1 = simd.convert_i8x16_to_i16x16(cast::<[i8; 16], i8x16>(r1[j]));
                    let x2 = simd.convert_i8x16_to_i16x16(cast::<[i8; 16], i8x16>(r2[j]));
                    let x3 = simd.convert_i8x16_to_i16x16(cast::<[i8; 16], i8x16>(r3[j]));
                    a0 = add(simd, a0, simd.multiply_wrapping_add_adjacent_i16x16(qv, x0));
                    a1 = add(simd, a1, simd.multiply_wrapping_add_adjacent_i16x16(qv, x1));
                    a2 = add(simd, a2, simd.multiply_wrapping_add_adjacent_i16x16(qv, x2));
                    a3 = add(simd, a3, simd.multiply_wrapping_add_adjacent_i16x16(qv, x3));
                }
                out[i] = hsum(a0);
                out[i + 1] = hsum(a1);
                out[i + 2] = hsum(a2);
                out[i + 3] = hsum(a3);
                i += 4;
            }
            while i < n {
                let (r, _) = pulp::as_arrays::<16, i8>(&data[i * stride..(i + 1) * stride]);
                let mut a = zero;
                for (qj, rj) in qa.iter().zip(r) {
                    let qv: i16x16 = cast(*qj);
                    let x = simd.convert_i8x16_to_i16x16(cast::<[i8; 16], i8x16>(*rj));
                    a = add(simd, a, simd.multiply_wrapping_add_adjacent_i16x16(qv, x));
                }
                out[i] = hsum(a);
                i += 1;
            }
        }
    }
}

#[inline(always)]
fn dot1<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let mut acc0 = s.splat_f32s(0.0);
    let mut acc1 = s.splat_f32s(0.0);
    let mut ac = ah.chunks_exact(2);
    let mut bc = bh.chunks_exact(2);
    for (x, y) in (&mut ac).zip(&mut bc) {
        acc0 = s.mul_add_e_f32s(x[0], y[0], acc0);
        acc1 = s.mul_add_e_f32s(x[1], y[1], acc1);
    }
    if let (Some(&x), Some(&y)) = (ac.remainder().first(), bc.remainder().first()) {
        acc0 = s.mul_add_e_f32s(x, y, acc0);
    }
    let mut r = s.reduce_sum_f32s(s.add_f32s(acc0, acc1));
    for (x, y) in at.iter().zip(bt) {
        r += x * y;
    }
    r
}

/// Four rows at once; per row exactly the operations of [`dot1`], in the same
/// order, so the results are bit-identical to four `dot1` calls.
#[inline(always)]
fn dot4<S: Simd>(s: S, q: &[f32], r0: &[f32], r1: &[f32], r2: &[f32], r3: &[f32]) -> [f32; 4] {
    let (qh, qt) = S::as_simd_f32s(q);
    let (h0, t0) = S::as_simd_f32s(r0);
    let (h1, t1) = S::as_simd_f32s(r1);
    let (h2, t2) = S::as_simd_f32s(r2);
    let (h3, t3) = S::as_simd_f32s(r3);
    let n = qh
        .len()
        .min(h0.len())
        .min(h1.len())
        .min(h2.len())
        .min(h3.len());
    let (qh, h0, h1, h2, h3) = (&qh[..n], &h0[..n], &h1[..n], &h2[..n], &h3[..n]);
    let z = s.splat_f32s(0.0);
    let (mut a0, mut b0, mut a1, mut b1) = (z, z, z, z);
    let (mut a2, mut b2, mut a3, mut b3) = (z, z, z, z);
    let pairs = n / 2;
    for j in 0..pairs {
        let e = 2 * j;
        let o = e + 1;
        let (qe, qo) = (qh[e], qh[o]);
        a0 = s.mul_add_e_f32s(qe, h0[e], a0);
        b0 = s.mul_add_e_f32s(qo, h0[o], b0);
        a1 = s.mul_add_e_f32s(qe, h1[e], a1);
        b1 = s.mul_add_e_f32s(qo, h1[o], b1);
        a2 = s.mul_add_e_f32s(qe, h2[e], a2);
        b2 = s.mul_add_e_f32s(qo, h2[o], b2);
        a3 = s.mul_add_e_f32s(qe, h3[e], a3);
        b3 = s.mul_add_e_f32s(qo, h3[o], b3);
    }
    if n % 2 == 1 {
        let l = n - 1;
        a0 = s.mul_add_e_f32s(qh[l], h0[l], a0);
        a1 = s.mul_add_e_f32s(qh[l], h1[l], a1);
        a2 = s.mul_add_e_f32s(qh[l], h2[l], a2);
        a3 = s.mul_add_e_f32s(qh[l], h3[l], a3);
    }
    let mut r = [
        s.reduce_sum_f32s(s.add_f32s(a0, b0)),
        s.reduce_sum_f32s(s.add_f32s(a1, b1)),
        s.reduce_sum_f32s(s.add_f32s(a2, b2)),
        s.reduce_sum_f32s(s.add_f32s(a3, b3)),
    ];
    for (i, t) in [t0, t1, t2, t3].into_iter().enumerate() {
        for (x, y) in qt.iter().zip(t) {
            r[i] += x * y;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vecs(n: usize, d: usize) -> Vec<f32> {
        // Deterministic pseudo-random values in [-1, 1).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n * d)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn integer_kernel_is_exact() {
        for &stride in &[16usize, 64, 384] {
            let n = 9;
            let vals = vecs(n + 1, stride);
            let q: Vec<i16> = vals[..stride].iter().map(|x| (x * 127.0) as i16).collect();
            let data: Vec<i8> = vals[stride..].iter().map(|x| (x * 127.0) as i8).collect();
            let mut out = vec![0i32; n];
            scan_i8(&q, &data, stride, &mut out);
            for i in 0..n {
                let want: i32 = q
                    .iter()
                    .zip(&data[i * stride..(i + 1) * stride])
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum();
                assert_eq!(out[i], want, "stride {stride} row {i}");
            }
        }
    }

    #[test]
    fn kernels_agree_bit_for_bit_and_match_f64() {
        for &d in &[16usize, 32, 48, 384] {
            let n = 11;
            let data = vecs(n + 1, d);
            let (q, rows) = data.split_at(d);
            let mut scanned = vec![0.0; n];
            scan(q, rows, d, &mut scanned);
            let refs: Vec<&[f32]> = rows.chunks(d).collect();
            let mut gathered = vec![0.0; n];
            dots(q, &refs, &mut gathered);
            for i in 0..n {
                let single = dot(q, refs[i]);
                assert_eq!(single.to_bits(), scanned[i].to_bits(), "d={d} row={i}");
                assert_eq!(single.to_bits(), gathered[i].to_bits(), "d={d} row={i}");
                let exact: f64 = q
                    .iter()
                    .zip(refs[i])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!((exact - single as f64).abs() < 1e-4, "{exact} vs {single}");
            }
        }
    }
}
