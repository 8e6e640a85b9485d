//! Vector storage: one contiguous block of rows per partition.
//!
//! A search over an allowed set of partitions is then a sequence of
//! contiguous scans, one per partition, with no per-vector filter test. Each
//! partition also records which graph node each row is (if any). Rows
//! `0..indexed` are graph nodes; rows `indexed..` were inserted after the last
//! graph build or extension and are "pending": the graph path scans them
//! exactly. Removal keeps that split (see `VectorIndex::remove`).

use zeroize::Zeroize;

use crate::quant::QMeta;
use crate::rowbuf::RowBuf;

/// Marker for "no graph node".
pub(crate) const NO_NODE: u32 = u32::MAX;

/// The vectors of one partition.
///
/// Invariants: `keys`, `nodes`, `data`, `qdata` and `qmeta` have the same
/// number of rows, row `r` of `qdata`/`qmeta` is the quantisation of row `r`
/// of `data`; `nodes[r] != NO_NODE` exactly for `r < indexed`.
#[derive(Debug)]
pub(crate) struct Partition {
    /// The caller's partition id.
    pub(crate) id: u32,
    /// Key of each row.
    pub(crate) keys: Vec<u64>,
    /// Graph node of each row, `NO_NODE` for pending rows.
    pub(crate) nodes: Vec<u32>,
    /// Normalised vectors, padded to the stride.
    pub(crate) data: RowBuf,
    /// The same vectors quantised to `i8` (module `quant`).
    pub(crate) qdata: RowBuf<i8>,
    /// Scale and error terms of each quantised row.
    pub(crate) qmeta: Vec<QMeta>,
    /// Rows `0..indexed` are in the graph.
    pub(crate) indexed: usize,
}

impl Partition {
    /// An empty partition.
    pub(crate) fn new(id: u32, stride: usize, qstride: usize) -> Self {
        Self {
            id,
            keys: Vec::new(),
            nodes: Vec::new(),
            data: RowBuf::new(stride),
            qdata: RowBuf::new(qstride),
            qmeta: Vec::new(),
            indexed: 0,
        }
    }

    /// Number of vectors.
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.keys.len(), self.data.len());
        self.keys.len()
    }

    /// Drops spare capacity (after a bulk load).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.data.shrink_to_fit();
        self.qdata.shrink_to_fit();
        self.qmeta.shrink_to_fit();
        self.keys.shrink_to_fit();
        self.nodes.shrink_to_fit();
    }

    /// Number of rows not yet in the graph.
    pub(crate) fn pending(&self) -> usize {
        self.len() - self.indexed
    }

    /// Row `r` (padded).
    #[inline]
    pub(crate) fn row(&self, r: usize) -> &[f32] {
        self.data.row(r)
    }

    /// Appends a row (already normalised and padded) with its quantisation.
    pub(crate) fn push(&mut self, key: u64, row: &[f32], qrow: &[i8], meta: QMeta) {
        self.data.push(row);
        self.qdata.push(qrow);
        self.qmeta.push(meta);
        self.keys.push(key);
        self.nodes.push(NO_NODE);
    }

    /// Copies row `from` over row `to` in every column.
    pub(crate) fn copy_row(&mut self, from: usize, to: usize) {
        if from == to {
            return;
        }
        self.data.copy_row(from, to);
        self.qdata.copy_row(from, to);
        self.qmeta[to] = self.qmeta[from];
        self.keys[to] = self.keys[from];
        self.nodes[to] = self.nodes[from];
    }

    /// Drops the last row, zeroising its vector data.
    pub(crate) fn pop_zeroed(&mut self) {
        self.data.pop_zeroed();
        self.qdata.pop_zeroed();
        if let Some(m) = self.qmeta.last_mut() {
            m.zeroize();
        }
        self.qmeta.pop();
        self.keys.pop();
        self.nodes.pop();
    }
}
