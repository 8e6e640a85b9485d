//! The summation order of CPU matrix products, made the same on every
//! x86-64 host.
//!
//! Why: gemm (candle's CPU `matmul`, and the products inside lethe's
//! convolution kernels) sums the depth `k` of a large product in blocks,
//! one after another, and sizes the blocks from the host's L1 data cache
//! (`gemm-common` 0.19, `cache::kernel_params`): never under 512, 512 on a
//! 32 KiB 8-way L1 (AMD Zen 3, this project's dev machines), 1024 on a 48
//! KiB 12-way L1 (recent Intel Xeons). A product with `k > 512` therefore
//! rounds differently on the two, and crafting or training a model
//! amplifies that: the protection headline moved by 15-30 points between
//! two hosts running the same code (`evals/results/protect/README.md`).
//!
//! A product handed to gemm with `k <= 512` is summed in one block on any
//! host (gemm's block is `max(512, ..).min(k)`). So the products that gemm
//! would block by the host's cache are cut here into depth blocks of at
//! most [`DEPTH_BLOCK`], summed one after another into the destination,
//! exactly as gemm sums its own blocks. The blocks are the ones gemm picks
//! where its block is 512 (`k` split into `ceil(k / 512)` equal blocks,
//! the last shorter), so results on such a host are unchanged, bit for
//! bit, and other hosts now get the same bits.
//!
//! What stays host-dependent: other instruction sets (gemm's AVX-512
//! kernels are not built; Arm and non-FMA x86 run other kernels), and
//! candle's `matmul` outside [`super::linear_product`] and the vision
//! models' convolutions (the language models' paths).

use std::ops::Range;

/// The largest depth gemm is handed in one call where it would otherwise
/// block the depth by the host's cache: gemm's smallest cache block, so
/// it sums such a call in one pass everywhere.
pub(crate) const DEPTH_BLOCK: usize = 512;

/// The strides gemm is called with, `(row, column)` per matrix, in
/// elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Strides {
    /// The `m x k` left operand.
    pub lhs: (isize, isize),
    /// The `k x n` right operand.
    pub rhs: (isize, isize),
    /// The `m x n` destination.
    pub dst: (isize, isize),
}

/// Whether gemm-common 0.19 would sum the depth of an `m x k` by `k x n`
/// f32 product in blocks sized by the host's cache. It mirrors gemm's
/// dispatch (`gemm_basic_generic`): depths of at most 512, the x86 FMA
/// horizontal kernels (`m n <= 256`, contiguous depth on both sides), the
/// matrix-vector kernels and the small-product path (`m, n <= 64`, fixed
/// blocks of 512) do not depend on the host.
pub(crate) fn host_blocked(m: usize, n: usize, k: usize, s: Strides) -> bool {
    let ((lhs_rs, lhs_cs), (rhs_rs, rhs_cs), (dst_rs, dst_cs)) = (s.lhs, s.rhs, s.dst);
    if k <= DEPTH_BLOCK || m == 0 || n == 0 {
        return false;
    }
    let horizontal =
        cfg!(target_arch = "x86_64") && lhs_cs == 1 && rhs_rs == 1 && m.saturating_mul(n) <= 256;
    let gemv = (n <= 1 && lhs_rs == 1 && dst_rs == 1)
        || (n <= 1 && lhs_cs == 1 && rhs_rs == 1)
        || (m <= 1 && rhs_cs == 1 && dst_cs == 1)
        || (m <= 1 && rhs_rs == 1 && lhs_cs == 1);
    let small = m <= 64 && n <= 64;
    !(horizontal || gemv || small)
}

/// `count` ranges of `size` covering `0..len`, the last one shorter; one
/// empty range for `len == 0`.
fn ranges(len: usize, size: usize) -> impl Iterator<Item = Range<usize>> {
    let size = size.max(1);
    (0..len.div_ceil(size).max(1)).map(move |i| i * size..((i + 1) * size).min(len))
}

/// `ceil(len / DEPTH_BLOCK)` equal ranges covering `0..len`, the last one
/// shorter: gemm's own split of a depth `len` where its block is 512. One
/// range `0..len` when `len <= DEPTH_BLOCK` (also for `len == 0`).
pub(crate) fn blocks(len: usize) -> impl Iterator<Item = Range<usize>> {
    ranges(len, len.div_ceil(len.div_ceil(DEPTH_BLOCK).max(1)))
}

/// The depth ranges to hand gemm one call at a time for an `m x k` by
/// `k x n` product with strides `s`: [`blocks`] where gemm would block by
/// the host's cache ([`host_blocked`]), else the whole depth.
pub(crate) fn depth_blocks(
    m: usize,
    n: usize,
    k: usize,
    s: Strides,
) -> impl Iterator<Item = Range<usize>> {
    let size = if host_blocked(m, n, k, s) {
        k.div_ceil(k.div_ceil(DEPTH_BLOCK))
    } else {
        k
    };
    ranges(k, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's call for `x (m, k)` times the transpose of `w (n, k)`.
    fn candle_linear(n: usize, k: usize) -> Strides {
        Strides {
            lhs: (k as isize, 1),
            rhs: (1, k as isize),
            dst: (n as isize, 1),
        }
    }

    #[test]
    fn blocks_cover_the_depth_in_equal_parts_of_at_most_512() {
        for len in [1, 2, 511, 512, 513, 576, 1024, 1025, 2048, 4099] {
            let b: Vec<_> = blocks(len).collect();
            assert_eq!(b.first().unwrap().start, 0, "{len}");
            assert_eq!(b.last().unwrap().end, len, "{len}");
            assert!(b.windows(2).all(|w| w[0].end == w[1].start), "{len}");
            assert!(b.iter().all(|r| !r.is_empty() && r.len() <= DEPTH_BLOCK));
            assert_eq!(b.len(), len.div_ceil(DEPTH_BLOCK), "{len}");
            // Equal parts, the last one possibly shorter (gemm's split).
            assert!(b.iter().all(|r| r.len() <= b[0].len()), "{len}");
        }
        let b: Vec<_> = blocks(576).collect();
        assert_eq!(b, vec![0..288, 288..576]);
        let b: Vec<_> = blocks(1025).collect();
        assert_eq!(b, vec![0..342, 342..684, 684..1025]);
        assert_eq!(blocks(0).collect::<Vec<_>>(), vec![0..0]);
    }

    #[test]
    fn only_products_gemm_blocks_by_the_cache_are_split() {
        // The CNN head on a training batch: 128 x 2048 by 2048 x 4.
        let s = candle_linear(4, 2048);
        assert!(host_blocked(128, 4, 2048, s));
        assert_eq!(depth_blocks(128, 4, 2048, s).count(), 4);
        // A shallow product, a small one and a matrix-vector one are not.
        assert!(!host_blocked(128, 4, 512, s));
        assert!(!host_blocked(64, 4, 2048, s));
        assert!(!host_blocked(1, 300, 2048, s));
        assert_eq!(
            depth_blocks(64, 4, 2048, s).collect::<Vec<_>>(),
            vec![0..2048]
        );
        // A convolution's kernel gradient: 8 x 1024 by 1024 x 72.
        let conv = Strides {
            lhs: (1024, 1),
            rhs: (1, 1024),
            dst: (72, 1),
        };
        assert!(host_blocked(8, 72, 1024, conv));
        // Few outputs with contiguous depth: gemm's horizontal kernels on
        // x86 (fixed blocks of 1024), elsewhere its cache-blocked path.
        let few = host_blocked(128, 2, 2048, candle_linear(2, 2048));
        assert_eq!(few, !cfg!(target_arch = "x86_64"));
    }
}
