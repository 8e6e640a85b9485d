//! [`VectorIndex`]: the arena, the optional graph, the planner, and the two
//! search routes.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use zeroize::Zeroizing;

use crate::arena::{Partition, NO_NODE};
use crate::graph::{Graph, NodeLoc, Shape};
use crate::kernel;
use crate::planner::{Demand, Plan, PlannerParams, Route};
use crate::quant::{self, QMeta};
use crate::rowbuf::LINE_FLOATS;
use crate::topk::{self, TopK};
use crate::{Error, Filter, Result};

/// Largest supported dimension.
pub const MAX_DIM: usize = 1 << 16;

/// One search result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// The caller's key of the vector.
    pub key: u64,
    /// Cosine similarity to the query (inner product of unit vectors).
    pub score: f32,
}

/// How to build the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphParams {
    /// Links per node on the upper layers; layer 0 holds up to `2 m`.
    pub m: usize,
    /// Beam width while inserting (higher: better graph, slower build).
    pub ef_construction: usize,
    /// Build threads.
    pub threads: usize,
    /// Seed of level assignment and insertion order.
    pub seed: u64,
}

impl Default for GraphParams {
    /// `m = 16, ef_construction = 100, threads = 2, seed = 0`: the settings
    /// of the peer measurements in the benchmark.
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 100,
            threads: 2,
            seed: 0,
        }
    }
}

impl GraphParams {
    fn validate(&self) -> Result<Shape> {
        if !(2..=128).contains(&self.m) {
            return Err(Error::InvalidParams(format!(
                "m must be in 2..=128, got {}",
                self.m
            )));
        }
        if !(1..=10_000).contains(&self.ef_construction) {
            return Err(Error::InvalidParams(format!(
                "ef_construction must be in 1..=10000, got {}",
                self.ef_construction
            )));
        }
        if !(1..=1024).contains(&self.threads) {
            return Err(Error::InvalidParams(format!(
                "threads must be in 1..=1024, got {}",
                self.threads
            )));
        }
        Ok(Shape {
            m: self.m,
            m0: 2 * self.m,
            ef_construction: self.ef_construction,
            seed: self.seed,
        })
    }
}

/// Freshness of the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphStatus {
    /// Whether a graph exists at all.
    pub built: bool,
    /// Live vectors in the graph.
    pub nodes: usize,
    /// Removed vectors whose (vector-less) node slots remain until a rebuild.
    pub tombstones: usize,
    /// Vectors inserted since the last build or extension, served by exact scan.
    pub pending: usize,
}

impl GraphStatus {
    /// A graph exists, covers every vector and has no tombstones.
    pub fn is_fresh(&self) -> bool {
        self.built && self.pending == 0 && self.tombstones == 0
    }
}

/// Which route a search should take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Let the planner decide (the default).
    #[default]
    Auto,
    /// Always scan exactly.
    Exact,
    /// Use the graph whenever one exists (no evaluation budget; still falls
    /// back to exact if it finds fewer than `k` allowed vectors).
    Graph,
}

/// Per-search options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchOptions {
    /// Route selection.
    pub strategy: Strategy,
    /// Beam width for the graph route; `None`: the planner's.
    pub ef: Option<usize>,
}

/// Hits plus how they were found.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchOutput {
    /// Best first; ties by ascending key.
    pub hits: Vec<Hit>,
    /// The route taken.
    pub route: Route,
    /// Vectors scored: rows scanned plus graph distance evaluations.
    pub scored: usize,
}

/// `f32` with the total order of `f32::total_cmp`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct OrdF32(f32);

impl Eq for OrdF32 {}
impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    part: u32,
    row: u32,
}

/// The allowed partitions of one query.
struct Selection {
    parts: Vec<u32>,
    allowed: usize,
    allowed_indexed: usize,
    all: bool,
}

/// A dense vector index partitioned by caller-given ids, with exact filtered
/// search, an optional HNSW graph, and real erasure. See the crate docs.
///
/// `search` takes `&self` and may run on many threads at once; mutation
/// (`insert`, `remove`, graph builds) takes `&mut self`.
#[derive(Debug)]
pub struct VectorIndex {
    dim: usize,
    stride: usize,
    qstride: usize,
    pub(crate) parts: Vec<Partition>,
    part_of: HashMap<u32, u32>,
    slots: HashMap<u64, Slot>,
    pub(crate) graph: Option<Graph>,
    planner: PlannerParams,
}

impl VectorIndex {
    /// An empty index for vectors of `dim` components.
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 || dim > MAX_DIM {
            return Err(Error::InvalidParams(format!(
                "dimension must be in 1..={MAX_DIM}, got {dim}"
            )));
        }
        Ok(Self {
            dim,
            stride: dim.div_ceil(LINE_FLOATS) * LINE_FLOATS,
            qstride: quant::i8_stride(dim),
            parts: Vec::new(),
            part_of: HashMap::new(),
            slots: HashMap::new(),
            graph: None,
            planner: PlannerParams::default(),
        })
    }

    /// The dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    pub(crate) fn qstride(&self) -> usize {
        self.qstride
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the index holds no vector.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: u64) -> bool {
        self.slots.contains_key(&key)
    }

    /// The partition `key` was inserted under.
    pub fn partition_of(&self, key: u64) -> Option<u32> {
        let s = self.slots.get(&key)?;
        Some(self.parts[s.part as usize].id)
    }

    /// The stored (unit-length) vector of `key`.
    pub fn vector(&self, key: u64) -> Option<&[f32]> {
        let s = self.slots.get(&key)?;
        Some(&self.parts[s.part as usize].row(s.row as usize)[..self.dim])
    }

    /// Number of vectors in `partition`.
    pub fn partition_len(&self, partition: u32) -> usize {
        self.part_of
            .get(&partition)
            .map_or(0, |&p| self.parts[p as usize].len())
    }

    /// The cost-model constants in use.
    pub fn planner(&self) -> PlannerParams {
        self.planner
    }

    /// Replaces the cost-model constants.
    pub fn set_planner(&mut self, params: PlannerParams) -> Result<()> {
        if !params.is_valid() {
            return Err(Error::InvalidParams(format!(
                "planner constants out of range: {params:?}"
            )));
        }
        self.planner = params;
        Ok(())
    }

    /// Heap bytes held by the index (vectors, keys, maps, graph), approximately.
    pub fn memory_bytes(&self) -> usize {
        let parts: usize = self
            .parts
            .iter()
            .map(|p| {
                p.data.allocated_bytes()
                    + p.qdata.allocated_bytes()
                    + p.qmeta.capacity() * std::mem::size_of::<QMeta>()
                    + p.keys.capacity() * 8
                    + p.nodes.capacity() * 4
            })
            .sum();
        let maps = self.slots.capacity() * (8 + std::mem::size_of::<Slot>() + 1)
            + self.part_of.capacity() * 9;
        parts + maps + self.graph.as_ref().map_or(0, Graph::memory_bytes)
    }

    /// Validates `v` and writes its unit-length, zero-padded copy into `out`.
    fn normalise_into(&self, v: &[f32], out: &mut Vec<f32>) -> Result<()> {
        if v.len() != self.dim {
            return Err(Error::DimensionMismatch {
                expected: self.dim,
                got: v.len(),
            });
        }
        if let Some(position) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite { position });
        }
        let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        if norm <= 0.0 || !norm.is_finite() {
            return Err(Error::ZeroVector);
        }
        out.clear();
        out.extend(v.iter().map(|&x| (x as f64 / norm) as f32));
        if out.iter().all(|&x| x == 0.0) {
            return Err(Error::ZeroVector);
        }
        out.resize(self.stride, 0.0);
        Ok(())
    }

    /// Adds `vector` (normalised to unit length) under `key` in `partition`.
    ///
    /// Errors on a wrong dimension, a non-finite or all-zero vector, and a key
    /// already present. The vector is served by exact scan until the next
    /// [`build_graph`](Self::build_graph) or [`extend_graph`](Self::extend_graph).
    pub fn insert(&mut self, key: u64, partition: u32, vector: &[f32]) -> Result<()> {
        // Temporary copies of the vector are zeroised when dropped, so no
        // stray copy outlives a later `remove` in freed heap memory.
        let mut row = Zeroizing::new(Vec::with_capacity(self.stride));
        self.normalise_into(vector, &mut row)?;
        if self.slots.contains_key(&key) {
            return Err(Error::DuplicateKey(key));
        }
        let p = match self.part_of.get(&partition) {
            Some(&p) => p,
            None => {
                let p = u32::try_from(self.parts.len())
                    .ok()
                    .filter(|&p| p < u32::MAX)
                    .ok_or(Error::CapacityExceeded("more than 2^32 - 1 partitions"))?;
                self.parts
                    .push(Partition::new(partition, self.stride, self.qstride));
                self.part_of.insert(partition, p);
                p
            }
        };
        let part = &mut self.parts[p as usize];
        let r = u32::try_from(part.len())
            .ok()
            .filter(|&r| r < u32::MAX)
            .ok_or(Error::CapacityExceeded(
                "more than 2^32 - 1 vectors in a partition",
            ))?;
        let mut qrow = Zeroizing::new(vec![0i8; self.qstride]);
        let meta = quant::quantize(&row[..self.dim], &mut qrow);
        part.push(key, &row, &qrow, meta);
        self.slots.insert(key, Slot { part: p, row: r });
        Ok(())
    }

    /// Erases `key`. Returns whether it was present.
    ///
    /// When this returns, the vector's bytes are overwritten in the arena
    /// (its row is overwritten by another row and the vacated row is zeroised),
    /// no graph node refers to them (the node becomes a tombstone and its
    /// neighbours are re-linked around it), and the next
    /// [`save`](Self::save) writes files without them.
    pub fn remove(&mut self, key: u64) -> bool {
        let Some(slot) = self.slots.remove(&key) else {
            return false;
        };
        let (p, r) = (slot.part as usize, slot.row as usize);
        if let Some(g) = self.graph.as_mut() {
            let node = self.parts[p].nodes[r];
            if node != NO_NODE {
                g.remove(&self.parts, node);
            }
        }
        let indexed = self.parts[p].indexed;
        if r < indexed {
            // Keep rows 0..indexed in the graph: the last graph row fills the
            // hole, the last pending row fills the graph row's old place.
            let last_graph = indexed - 1;
            self.move_row(p, last_graph, r);
            let last = self.parts[p].len() - 1;
            self.move_row(p, last, last_graph);
            self.parts[p].indexed -= 1;
        } else {
            let last = self.parts[p].len() - 1;
            self.move_row(p, last, r);
        }
        self.parts[p].pop_zeroed();
        true
    }

    /// Moves row `from` of partition `p` onto row `to`, updating the key slot
    /// and graph location of the moved vector. Row `from` keeps a stale copy
    /// that the caller overwrites or zeroises.
    fn move_row(&mut self, p: usize, from: usize, to: usize) {
        if from == to {
            return;
        }
        let part = &mut self.parts[p];
        part.copy_row(from, to);
        let key = part.keys[to];
        let node = part.nodes[to];
        if let Some(s) = self.slots.get_mut(&key) {
            s.row = to as u32;
        }
        if node != NO_NODE {
            if let Some(g) = self.graph.as_mut() {
                g.loc[node as usize] = NodeLoc {
                    part: p as u32,
                    row: to as u32,
                };
            }
        }
    }

    /// Builds the graph over all vectors from scratch (replacing any graph).
    pub fn build_graph(&mut self, params: &GraphParams) -> Result<()> {
        let shape = params.validate()?;
        self.drop_graph();
        let t = std::time::Instant::now();
        for part in &mut self.parts {
            part.shrink_to_fit();
        }
        let mut locs = Vec::with_capacity(self.len());
        for (p, part) in self.parts.iter().enumerate() {
            for r in 0..part.len() {
                locs.push(NodeLoc {
                    part: p as u32,
                    row: r as u32,
                });
            }
        }
        let mut g = Graph::new(shape);
        g.extend(&self.parts, &locs, params.threads)?;
        for (node, l) in locs.iter().enumerate() {
            let part = &mut self.parts[l.part as usize];
            part.nodes[l.row as usize] = node as u32;
        }
        for part in &mut self.parts {
            part.indexed = part.len();
        }
        self.graph = Some(g);
        tracing::info!(
            vectors = locs.len(),
            m = params.m,
            ef_construction = params.ef_construction,
            threads = params.threads,
            secs = t.elapsed().as_secs_f64(),
            "built vector graph"
        );
        Ok(())
    }

    /// Links the pending vectors into the existing graph (same shape), on
    /// `threads` threads. Errors if no graph exists.
    pub fn extend_graph(&mut self, threads: usize) -> Result<()> {
        if threads == 0 {
            return Err(Error::InvalidParams("threads must be at least 1".into()));
        }
        let Self { parts, graph, .. } = self;
        let Some(g) = graph.as_mut() else {
            return Err(Error::InvalidParams(
                "no graph to extend; call build_graph first".into(),
            ));
        };
        let start = g.len();
        let mut locs = Vec::new();
        for (p, part) in parts.iter().enumerate() {
            for r in part.indexed..part.len() {
                locs.push(NodeLoc {
                    part: p as u32,
                    row: r as u32,
                });
            }
        }
        g.extend(parts, &locs, threads)?;
        for (i, l) in locs.iter().enumerate() {
            parts[l.part as usize].nodes[l.row as usize] = (start + i) as u32;
        }
        for part in parts.iter_mut() {
            part.indexed = part.len();
        }
        tracing::debug!(added = locs.len(), "extended vector graph");
        Ok(())
    }

    /// Discards the graph; searches use the exact route until the next build.
    pub fn drop_graph(&mut self) {
        self.graph = None;
        for part in &mut self.parts {
            part.nodes.fill(NO_NODE);
            part.indexed = 0;
        }
    }

    /// Whether the graph exists and how far it lags behind the vectors.
    pub fn graph_status(&self) -> GraphStatus {
        match &self.graph {
            None => GraphStatus {
                built: false,
                nodes: 0,
                tombstones: 0,
                pending: self.len(),
            },
            Some(g) => GraphStatus {
                built: true,
                nodes: g.alive(),
                tombstones: g.len() - g.alive(),
                pending: self.parts.iter().map(Partition::pending).sum(),
            },
        }
    }

    /// The planner's decision for a search of `k` hits under `filter`.
    pub fn plan(&self, k: usize, filter: &Filter) -> Plan {
        let sel = self.select(filter);
        self.plan_for(k, &sel)
    }

    fn plan_for(&self, k: usize, sel: &Selection) -> Plan {
        let row_bytes = if self.quantized(k, sel.allowed) {
            self.qstride
        } else {
            self.stride * 4
        };
        self.planner.plan(&Demand {
            k,
            stride: self.stride,
            exact_bytes: (sel.allowed * row_bytes) as f64,
            pending_bytes: ((sel.allowed - sel.allowed_indexed) * self.stride * 4) as f64,
            allowed: sel.allowed,
            allowed_indexed: sel.allowed_indexed,
            partitions: sel.parts.len(),
            graph_alive: self.graph.as_ref().map(Graph::alive),
        })
    }

    fn select(&self, filter: &Filter) -> Selection {
        let parts: Vec<u32> = match filter.ids() {
            None => (0..self.parts.len() as u32).collect(),
            Some(ids) => ids
                .iter()
                .filter_map(|id| self.part_of.get(id).copied())
                .collect(),
        };
        let (mut allowed, mut allowed_indexed) = (0, 0);
        for &p in &parts {
            let part = &self.parts[p as usize];
            allowed += part.len();
            allowed_indexed += part.indexed;
        }
        Selection {
            parts,
            allowed,
            allowed_indexed,
            all: filter.is_all(),
        }
    }

    /// The `k` vectors most similar to `query` among those whose partition
    /// `filter` allows, best first, ties by ascending key. Returns all allowed
    /// vectors when fewer than `k` exist.
    pub fn search(&self, query: &[f32], k: usize, filter: &Filter) -> Result<Vec<Hit>> {
        Ok(self
            .search_with(query, k, filter, &SearchOptions::default())?
            .hits)
    }

    /// [`search`](Self::search) with explicit options, reporting the route taken.
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        filter: &Filter,
        options: &SearchOptions,
    ) -> Result<SearchOutput> {
        let mut q = Vec::with_capacity(self.stride);
        self.normalise_into(query, &mut q)?;
        let sel = self.select(filter);
        if k == 0 || sel.allowed == 0 {
            return Ok(SearchOutput {
                hits: Vec::new(),
                route: Route::Exact,
                scored: 0,
            });
        }
        let plan = self.plan_for(k, &sel);
        let (use_graph, budget) = match options.strategy {
            Strategy::Exact => (false, 0),
            Strategy::Auto => (plan.route == Route::Graph, plan.budget),
            Strategy::Graph => (self.graph.is_some() && sel.allowed_indexed > 0, usize::MAX),
        };
        if use_graph {
            let ef = options.ef.unwrap_or(plan.ef).max(k);
            if let Some(out) = self.graph_route(&q, k, &sel, ef, budget) {
                return Ok(out);
            }
            let mut out = self.exact_route(&q, k, &sel.parts);
            out.route = Route::GraphThenExact;
            return Ok(out);
        }
        Ok(self.exact_route(&q, k, &sel.parts))
    }

    /// Whether the exact route scans the `i8` copies for `allowed` rows.
    fn quantized(&self, k: usize, allowed: usize) -> bool {
        allowed >= self.planner.quantized_min_rows && k.saturating_mul(4) < allowed
    }

    fn exact_route(&self, q: &[f32], k: usize, parts: &[u32]) -> SearchOutput {
        let allowed: usize = parts.iter().map(|&p| self.parts[p as usize].len()).sum();
        if self.quantized(k, allowed) {
            return self.exact_route_quantized(q, k, parts, allowed);
        }
        let mut top = TopK::new(k);
        for &p in parts {
            let part = &self.parts[p as usize];
            self.scan_rows(q, part, 0, part.len(), &mut top);
        }
        SearchOutput {
            hits: top.into_sorted(),
            route: Route::Exact,
            scored: allowed,
        }
    }

    /// Exact top-k through the `i8` copies: bounds from the quantised scan,
    /// exact `f32` re-scoring of every row that can still reach the top k
    /// (module `quant` has the argument).
    fn exact_route_quantized(
        &self,
        q: &[f32],
        k: usize,
        parts: &[u32],
        allowed: usize,
    ) -> SearchOutput {
        const BLOCK: usize = 256;
        let mut q8 = vec![0i8; self.qstride];
        let qm = quant::quantize(&q[..self.dim], &mut q8);
        let q16: Vec<i16> = q8.iter().map(|&v| v as i16).collect();
        let slack = quant::slack(self.dim);
        // The k largest lower bounds seen so far; `floor` is the smallest.
        let mut lowers: BinaryHeap<Reverse<OrdF32>> = BinaryHeap::with_capacity(k + 1);
        let mut floor = f32::NEG_INFINITY;
        let mut cands: Vec<(f32, u32, u32)> = Vec::new();
        let mut ints = [0i32; BLOCK];
        for &p in parts {
            let part = &self.parts[p as usize];
            let mut a = 0;
            while a < part.len() {
                let b = (a + BLOCK).min(part.len());
                let out = &mut ints[..b - a];
                kernel::scan_i8(&q16, part.qdata.rows(a, b), self.qstride, out);
                for (i, &dot) in out.iter().enumerate() {
                    let m = part.qmeta[a + i];
                    let approx = (qm.scale * m.scale) * dot as f32;
                    let bound = m.err + qm.err * m.norm + slack;
                    let lower = approx - bound;
                    if lowers.len() < k {
                        lowers.push(Reverse(OrdF32(lower)));
                        if lowers.len() == k {
                            floor = lowers.peek().map_or(f32::NEG_INFINITY, |r| r.0 .0);
                        }
                    } else if lower > floor {
                        lowers.pop();
                        lowers.push(Reverse(OrdF32(lower)));
                        floor = lowers.peek().map_or(f32::NEG_INFINITY, |r| r.0 .0);
                    }
                    let upper = approx + bound;
                    if upper >= floor {
                        cands.push((upper, p, (a + i) as u32));
                    }
                }
                if cands.len() > 4 * BLOCK {
                    cands.retain(|c| c.0 >= floor);
                }
                a = b;
            }
        }
        cands.retain(|c| c.0 >= floor);
        let rows: Vec<&[f32]> = cands
            .iter()
            .map(|&(_, p, r)| self.parts[p as usize].row(r as usize))
            .collect();
        let mut scores = vec![0.0f32; rows.len()];
        kernel::dots(q, &rows, &mut scores);
        let mut top = TopK::new(k);
        for (&(_, p, r), &s) in cands.iter().zip(&scores) {
            top.push(s, self.parts[p as usize].keys[r as usize]);
        }
        SearchOutput {
            hits: top.into_sorted(),
            route: Route::Exact,
            scored: allowed + cands.len(),
        }
    }

    fn scan_rows(&self, q: &[f32], part: &Partition, from: usize, to: usize, top: &mut TopK) {
        const BLOCK: usize = 256;
        let mut scores = [0.0f32; BLOCK];
        let mut a = from;
        while a < to {
            let b = (a + BLOCK).min(to);
            let out = &mut scores[..b - a];
            kernel::scan(q, part.data.rows(a, b), self.stride, out);
            for (i, &s) in out.iter().enumerate() {
                top.push(s, part.keys[a + i]);
            }
            a = b;
        }
    }

    /// Graph search plus exact scan of allowed pending rows; `None` when the
    /// graph cannot deliver enough allowed hits (the caller then scans).
    fn graph_route(
        &self,
        q: &[f32],
        k: usize,
        sel: &Selection,
        ef: usize,
        budget: usize,
    ) -> Option<SearchOutput> {
        let g = self.graph.as_ref()?;
        let bits = if sel.all {
            None
        } else {
            let mut bits = vec![0u64; self.parts.len().div_ceil(64)];
            for &p in &sel.parts {
                bits[p as usize / 64] |= 1 << (p % 64);
            }
            Some(bits)
        };
        let out = g.search(&self.parts, q, ef, bits.as_deref(), budget);
        let needed = k.min(sel.allowed_indexed);
        if out.aborted || out.found.len() < needed {
            tracing::debug!(
                found = out.found.len(),
                needed,
                evals = out.evals,
                aborted = out.aborted,
                "graph route fell back to exact scan"
            );
            return None;
        }
        let mut top = TopK::new(k);
        for s in &out.found {
            let l = g.loc[s.node as usize];
            top.push(s.score, self.parts[l.part as usize].keys[l.row as usize]);
        }
        let mut scored = out.evals;
        for &p in &sel.parts {
            let part = &self.parts[p as usize];
            if part.pending() > 0 {
                scored += part.pending();
                self.scan_rows(q, part, part.indexed, part.len(), &mut top);
            }
        }
        Some(SearchOutput {
            hits: top.into_sorted(),
            route: Route::Graph,
            scored,
        })
    }

    /// Scores `query` against one stored vector with the index's kernel, as
    /// every search would; `None` if `key` is absent.
    pub fn score(&self, query: &[f32], key: u64) -> Result<Option<f32>> {
        let mut q = Vec::with_capacity(self.stride);
        self.normalise_into(query, &mut q)?;
        Ok(self.slots.get(&key).map(|s| {
            let row = self.parts[s.part as usize].row(s.row as usize);
            kernel::dot(&q, row)
        }))
    }

    /// Whether any arena block (spare capacity included) holds `v` bit for bit.
    #[cfg(test)]
    pub(crate) fn memory_contains(&self, v: &[f32]) -> bool {
        let mut q = vec![0i8; self.qstride];
        quant::quantize(v, &mut q);
        self.parts
            .iter()
            .any(|p| p.data.block_contains(v) || p.qdata.block_contains(&q[..self.dim]))
    }

    // ---- persistence support -------------------------------------------------

    /// Rebuilds an index from loaded partitions (rows already normalised and
    /// padded), checking key uniqueness. Returns a description of a violation.
    pub(crate) fn from_loaded(
        dim: usize,
        parts: Vec<Partition>,
        graph: Option<Graph>,
    ) -> std::result::Result<Self, String> {
        let mut index = Self::new(dim).map_err(|e| e.to_string())?;
        for (p, part) in parts.iter().enumerate() {
            if index.part_of.insert(part.id, p as u32).is_some() {
                return Err(format!("partition {} stored twice", part.id));
            }
            for (r, &key) in part.keys.iter().enumerate() {
                let slot = Slot {
                    part: p as u32,
                    row: r as u32,
                };
                if index.slots.insert(key, slot).is_some() {
                    return Err(format!("key {key} stored twice"));
                }
            }
        }
        index.parts = parts;
        index.graph = graph;
        Ok(index)
    }
}

/// Orders hits the way every search does (best first, ties by key).
pub fn sort_hits(hits: &mut [Hit]) {
    hits.sort_by(topk::rank);
}
