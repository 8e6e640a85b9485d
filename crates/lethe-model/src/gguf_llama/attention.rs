//! Grouped-query attention over packed sequences, on the CPU.
//!
//! candle's CPU flash-attention kernel does an online softmax with a scalar
//! `exp` and a rescale per key, which measured about 7 ms per decoded token
//! with 500 cached tokens (more than all the matrix products of the step).
//! This kernel computes the scores of the query heads that share a key/value
//! head against each key row once, takes a two-pass softmax with a
//! vectorizable `exp`, and accumulates the value rows. Work items (a few query
//! rows of one sequence for one key/value head, or for one query head when a
//! single row is decoded) run on candle's thread pool.
//!
//! Keys of a sequence are either a contiguous run of rows or an explicit row
//! list (a path through the prefix trie of a packed batch), so shared
//! prefixes are read in place instead of gathered. Causal jobs treat their
//! query rows as the last rows of their key sequence and mask by loop bounds;
//! bidirectional jobs (the BERT embedder) let every row see every key. No
//! mask tensor is ever built, and packed sequences need no padding.

use std::ops::Range;
use std::sync::Mutex;

/// The key rows of one sequence, in position order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyRows<'a> {
    /// Rows `start..start + len`.
    Range {
        /// First row.
        start: usize,
        /// Number of rows.
        len: usize,
    },
    /// These rows.
    List(&'a [u32]),
}

impl KeyRows<'_> {
    fn len(&self) -> usize {
        match self {
            KeyRows::Range { len, .. } => *len,
            KeyRows::List(l) => l.len(),
        }
    }

    #[inline(always)]
    fn row(&self, j: usize) -> usize {
        match self {
            KeyRows::Range { start, .. } => start + j,
            KeyRows::List(l) => l[j] as usize,
        }
    }
}

/// One sequence: query rows (of the query and output buffers) and the keys
/// they see.
#[derive(Debug, Clone)]
pub(crate) struct Job<'a> {
    /// Rows of the query (and output) buffer.
    pub q_rows: Range<usize>,
    /// Rows of the key/value buffers.
    pub keys: KeyRows<'a>,
    /// Causal: the query rows are the last `q_rows.len()` positions of the
    /// key sequence and see only keys up to their own position. Otherwise
    /// every query row sees every key.
    pub causal: bool,
}

/// Head layout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads; query head `h` uses key/value head `h / (n_head / n_kv_head)`.
    pub n_kv_head: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// A strided view of `[rows, heads, head_dim]`: element `(r, h, d)` is at
/// `data[r * stride + h * head_stride + d]` (`head_stride == head_dim` for
/// row-major packed rows, `capacity * head_dim` for the head-major cache).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    /// The elements, starting at row 0, head 0.
    pub data: &'a [f32],
    /// Distance between rows, in elements.
    pub stride: usize,
    /// Distance between heads, in elements.
    pub head_stride: usize,
}

/// Query rows per work item.
const ROWS_PER_ITEM: usize = 8;

/// A unit of work: query rows `rows` of job `job` and query heads `heads`.
/// Its output is one contiguous region of the output buffer: either whole
/// rows (all heads), or some heads of a single row.
#[derive(Debug, Clone)]
struct Item {
    job: usize,
    rows: Range<usize>,
    heads: Range<usize>,
}

/// Attention output `[n_rows, n_head * head_dim]`. Rows not covered by a job
/// are left zero. Jobs must not share query rows (a bug in the caller, which
/// is this crate; it shows as a slice-bounds panic).
pub(crate) fn attend(
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    n_rows: usize,
    jobs: &[Job<'_>],
    heads: Heads,
    scale: f32,
) -> Vec<f32> {
    let hd = heads.head_dim;
    let qw = heads.n_head * hd;
    let rk = heads.n_head / heads.n_kv_head;
    let mut out = vec![0f32; n_rows * qw];
    // A single query row (decoding) is split per query head so that every
    // thread gets work; otherwise items are blocks of whole rows.
    let mut items = Vec::new();
    for (ji, job) in jobs.iter().enumerate() {
        let mut r = job.q_rows.start;
        while r < job.q_rows.end {
            let e = (r + ROWS_PER_ITEM).min(job.q_rows.end);
            if e - r == 1 && rk > 1 {
                items.extend((0..heads.n_head).map(|h| Item {
                    job: ji,
                    rows: r..e,
                    heads: h..h + 1,
                }));
            } else {
                items.push(Item {
                    job: ji,
                    rows: r..e,
                    heads: 0..heads.n_head,
                });
            }
            r = e;
        }
    }
    // Carve the output into the items' disjoint regions, in output order.
    let start = |it: &Item| it.rows.start * qw + it.heads.start * hd;
    items.sort_by_key(start);
    let mut regions = Vec::with_capacity(items.len());
    let mut rest: &mut [f32] = &mut out;
    let mut consumed = 0;
    for it in &items {
        let len = it.rows.len() * it.heads.len() * hd;
        let (_, tail) = rest.split_at_mut(start(it) - consumed);
        let (region, tail) = tail.split_at_mut(len);
        regions.push(Mutex::new(region));
        rest = tail;
        consumed = start(it) + len;
    }
    let run = |i: usize, scores: &mut Vec<f32>| {
        if let Ok(mut region) = regions[i].lock() {
            item(
                q,
                k,
                v,
                &jobs[items[i].job],
                &items[i],
                heads,
                scale,
                &mut region,
                scores,
            );
        }
    };
    // Multiply-adds of the whole call: below this, waking threads costs more.
    let work: usize = items
        .iter()
        .map(|it| it.rows.len() * jobs[it.job].keys.len() * it.heads.len() * hd)
        .sum();
    if work < 65_536 || items.len() == 1 {
        let mut scores = Vec::new();
        for i in 0..items.len() {
            run(i, &mut scores);
        }
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
            let mut scores = Vec::new();
            for i in range {
                run(i, &mut scores);
            }
        });
    }
    drop(regions);
    out
}

/// Computes one item into its output region `[rows, heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
fn item(
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    job: &Job<'_>,
    it: &Item,
    heads: Heads,
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let hd = heads.head_dim;
    let rk = heads.n_head / heads.n_kv_head;
    let kv_len = job.keys.len();
    let first_pos = kv_len - job.q_rows.len();
    let nh = it.heads.len();
    for (oi, i) in it.rows.clone().enumerate() {
        let n_keys = if job.causal {
            first_pos + (i - job.q_rows.start) + 1
        } else {
            kv_len
        };
        let orow = &mut out[oi * nh * hd..(oi + 1) * nh * hd];
        orow.fill(0.0);
        // Query heads grouped by the key/value head they share.
        let mut h = it.heads.start;
        while h < it.heads.end {
            let g = h / rk;
            let h_end = ((g + 1) * rk).min(it.heads.end);
            let m = h_end - h;
            scores.clear();
            scores.resize(m * n_keys, 0.0);
            let qrow = |r: usize| {
                let o = i * q.stride + (h + r) * q.head_stride;
                &q.data[o..o + hd]
            };
            for j in 0..n_keys {
                let kr = job.keys.row(j) * k.stride + g * k.head_stride;
                let krow = &k.data[kr..kr + hd];
                for r in 0..m {
                    scores[r * n_keys + j] = dot(qrow(r), krow) * scale;
                }
            }
            for r in 0..m {
                softmax_in_place(&mut scores[r * n_keys..(r + 1) * n_keys]);
            }
            let o = &mut orow[(h - it.heads.start) * hd..(h_end - it.heads.start) * hd];
            for j in 0..n_keys {
                let vr = job.keys.row(j) * v.stride + g * v.head_stride;
                let vrow = &v.data[vr..vr + hd];
                for r in 0..m {
                    axpy(&mut o[r * hd..(r + 1) * hd], scores[r * n_keys + j], vrow);
                }
            }
            h = h_end;
        }
    }
}

/// Dot product with eight independent lanes (so it vectorizes).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// `o += w * x`.
#[inline(always)]
fn axpy(o: &mut [f32], w: f32, x: &[f32]) {
    for (a, &b) in o.iter_mut().zip(x) {
        *a = b.mul_add(w, *a);
    }
}

/// Softmax of a row in place (max-subtracted, two passes).
fn softmax_in_place(x: &mut [f32]) {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            m[l] = m[l].max(c[l]);
        }
    }
    let mut max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &t in tail {
        max = max.max(t);
    }
    let mut s = [0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            c[l] = exp_approx(c[l] - max);
            s[l] += c[l];
        }
    }
    let mut sum = s.iter().sum::<f32>();
    for t in chunks.into_remainder() {
        *t = exp_approx(*t - max);
        sum += *t;
    }
    let inv = 1.0 / sum;
    for t in x.iter_mut() {
        *t *= inv;
    }
}

/// `e^x` for `x <= 0` (relative error about 2e-7; 0 below -87), written
/// without branches or calls so loops over it vectorize.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n * LN2_HI` is exact (Cody-Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * LOG2E + 0.5).floor();
    let g = x - n * LN2_HI - n * LN2_LO; // |g| <= ln2 / 2
    let p = 1.0
        + g * (1.0
            + g * (0.5
                + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_accurate() {
        let mut x = 0.0f32;
        while x > -90.0 {
            let want = x.exp();
            let got = exp_approx(x);
            if want > 1e-37 {
                assert!(
                    ((got - want) / want).abs() < 1e-6,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert!(got < 1e-36);
            }
            x -= 0.0137;
        }
    }

    /// Plain reference: explicit scores, mask and softmax per head.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        job: &Job<'_>,
        heads: Heads,
        scale: f32,
    ) -> Vec<(usize, Vec<f32>)> {
        let hd = heads.head_dim;
        let rk = heads.n_head / heads.n_kv_head;
        let kv_len = job.keys.len();
        let first = kv_len - job.q_rows.len();
        let mut out = Vec::new();
        for i in job.q_rows.clone() {
            let pos = if job.causal {
                first + i - job.q_rows.start
            } else {
                kv_len - 1
            };
            let mut row = vec![0f32; heads.n_head * hd];
            for h in 0..heads.n_head {
                let g = h / rk;
                let qh = &q[(i * heads.n_head + h) * hd..][..hd];
                let s: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let kr = &k[(job.keys.row(j) * heads.n_kv_head + g) * hd..][..hd];
                        qh.iter()
                            .zip(kr)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vr = &v[(job.keys.row(j) * heads.n_kv_head + g) * hd..][..hd];
                    for d in 0..hd {
                        row[h * hd + d] += (w / z) as f32 * vr[d];
                    }
                }
            }
            out.push((i, row));
        }
        out
    }

    #[test]
    fn matches_reference_on_packed_jobs() {
        let heads = Heads {
            n_head: 6,
            n_kv_head: 2,
            head_dim: 20,
        };
        let rows = 30;
        let mut state = 12345u64;
        let mut rnd = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let q: Vec<f32> = (0..rows * 6 * 20).map(|_| rnd() * 3.0).collect();
        let k: Vec<f32> = (0..rows * 2 * 20).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..rows * 2 * 20).map(|_| rnd()).collect();
        let path: Vec<u32> = vec![0, 1, 2, 3, 20, 21, 22, 23, 24, 25];
        let last: Vec<u32> = vec![0, 5, 17, 29];
        let jobs = [
            Job {
                q_rows: 0..20,
                keys: KeyRows::Range { start: 0, len: 20 },
                causal: true,
            },
            // Shares rows 0..4 with the first sequence.
            Job {
                q_rows: 20..26,
                keys: KeyRows::List(&path),
                causal: true,
            },
            // Continues a cache-like prefix: only the last 3 of 8 keys are queries.
            Job {
                q_rows: 26..29,
                keys: KeyRows::Range { start: 21, len: 8 },
                causal: true,
            },
            // One query row (decoding) over scattered keys.
            Job {
                q_rows: 29..30,
                keys: KeyRows::List(&last),
                causal: true,
            },
        ];
        fn view(data: &[f32], stride: usize) -> Rows<'_> {
            Rows {
                data,
                stride,
                head_stride: 20,
            }
        }
        let got = attend(
            view(&q, 120),
            view(&k, 40),
            view(&v, 40),
            rows,
            &jobs,
            heads,
            0.3,
        );
        for job in &jobs {
            for (i, want) in reference(&q, &k, &v, job, heads, 0.3) {
                let g = &got[i * 120..(i + 1) * 120];
                let diff = g
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-5, "row {i}: diff {diff}");
            }
        }
    }
}
