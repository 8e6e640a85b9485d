//! An HNSW graph whose nodes are only ids: vectors stay in the arena.
//!
//! This is the standard hierarchical navigable small-world graph (Malkov &
//! Yashunin, 2016/2018; construction and the neighbour-selection heuristic
//! follow hnswlib), with three differences that matter for lethe:
//!
//! * A node holds no copy of its vector. Distances read the row through
//!   `loc[node] -> (partition, row)` from the arena, so when a vector is erased
//!   from the arena it is gone from the graph too; its node becomes a
//!   tombstone that traversal skips.
//! * Removing a node repairs the graph: every neighbour that linked to it gets
//!   a new neighbour list chosen by the same heuristic from its old list plus
//!   the removed node's neighbours (as hnswlib's update repair does), so the
//!   graph stays navigable after many erasures without a rebuild.
//! * Layer-0 search takes a partition filter: every node is a stepping stone,
//!   but only allowed nodes enter the result set, and the search continues
//!   until `ef` allowed nodes are found (hnswlib's filtered search), under a
//!   budget of distance evaluations after which the caller falls back to an
//!   exact scan.
//!
//! Neighbour lists are arrays of `AtomicU32` (count, then ids): a parallel
//! build writes them under striped locks while concurrent readers load them
//! without locks, and a finished graph is searched with plain (relaxed) loads.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering as Mem};
use std::sync::{Mutex, MutexGuard};

use rayon::prelude::*;

use crate::arena::{Partition, NO_NODE};
use crate::kernel;
use crate::{Error, Result};

/// Highest layer a node can be assigned.
pub(crate) const MAX_LEVEL: usize = 15;
/// Number of write locks shared by the nodes during a parallel build.
const STRIPES: usize = 1024;

/// Where a node's vector lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NodeLoc {
    /// Dense partition index.
    pub(crate) part: u32,
    /// Row within the partition.
    pub(crate) row: u32,
}

impl NodeLoc {
    /// A removed node.
    pub(crate) const DEAD: NodeLoc = NodeLoc {
        part: u32::MAX,
        row: u32::MAX,
    };

    /// Whether the node was removed.
    pub(crate) fn is_dead(self) -> bool {
        self.part == u32::MAX
    }
}

/// A node with its similarity to the current query.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scored {
    pub(crate) score: f32,
    pub(crate) node: u32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.node.cmp(&self.node))
    }
}

/// Fixed shape of a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Links per node on layers >= 1 (and links chosen for a new node).
    pub(crate) m: usize,
    /// Link capacity on layer 0 (2m).
    pub(crate) m0: usize,
    /// Beam width while inserting.
    pub(crate) ef_construction: usize,
    /// Seed of level assignment and insertion order.
    pub(crate) seed: u64,
}

/// Result of a layer search.
#[derive(Debug, Default)]
pub(crate) struct LayerOut {
    /// Allowed nodes found, best first.
    pub(crate) found: Vec<Scored>,
    /// Distance evaluations spent.
    pub(crate) evals: usize,
    /// Whether the evaluation budget ran out.
    pub(crate) aborted: bool,
}

/// The graph. See the module documentation.
#[derive(Debug)]
pub(crate) struct Graph {
    shape: Shape,
    levels: Vec<u8>,
    /// Offset into `upper` of the node's layer-1 list (`usize::MAX` if level 0).
    upper_off: Vec<usize>,
    l0: Vec<AtomicU32>,
    upper: Vec<AtomicU32>,
    /// Where each node's vector is; `DEAD` for removed nodes.
    pub(crate) loc: Vec<NodeLoc>,
    /// `(level << 32) | node`; node `NO_NODE` when the graph has no live node.
    entry: AtomicU64,
    grow_lock: Mutex<()>,
    stripes: Vec<Mutex<()>>,
    alive: usize,
}

struct Visited {
    tags: Vec<u32>,
    epoch: u32,
}

impl Visited {
    fn begin(&mut self, n: usize) {
        if self.tags.len() < n {
            self.tags.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.tags.fill(0);
            self.epoch = 1;
        }
    }

    /// Marks `i`; true if it was not yet visited.
    #[inline]
    fn insert(&mut self, i: u32) -> bool {
        let t = &mut self.tags[i as usize];
        if *t == self.epoch {
            false
        } else {
            *t = self.epoch;
            true
        }
    }
}

thread_local! {
    static VISITED: RefCell<Visited> = const { RefCell::new(Visited { tags: Vec::new(), epoch: 0 }) };
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pack(node: u32, level: usize) -> u64 {
    ((level as u64) << 32) | node as u64
}

fn unpack(v: u64) -> (u32, usize) {
    (v as u32, (v >> 32) as usize)
}

/// SplitMix64 step: a well-mixed 64-bit hash.
pub(crate) fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn level_for(seed: u64, m: usize, node: u32) -> u8 {
    let h = splitmix(seed ^ splitmix(node as u64));
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let mult = 1.0 / (m as f64).ln();
    let l = (-u.ln() * mult).floor();
    (l.max(0.0) as usize).min(MAX_LEVEL) as u8
}

fn read_list(list: &[AtomicU32], out: &mut Vec<u32>) {
    out.clear();
    let c = (list[0].load(Mem::Acquire) as usize).min(list.len() - 1);
    out.extend(list[1..=c].iter().map(|a| a.load(Mem::Relaxed)));
}

fn write_list(list: &[AtomicU32], ids: &[u32]) {
    let n = ids.len().min(list.len() - 1);
    for (slot, id) in list[1..].iter().zip(&ids[..n]) {
        slot.store(*id, Mem::Relaxed);
    }
    list[0].store(n as u32, Mem::Release);
}

impl Graph {
    /// An empty graph of the given shape.
    pub(crate) fn new(shape: Shape) -> Self {
        Self {
            shape,
            levels: Vec::new(),
            upper_off: Vec::new(),
            l0: Vec::new(),
            upper: Vec::new(),
            loc: Vec::new(),
            entry: AtomicU64::new(pack(NO_NODE, 0)),
            grow_lock: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            alive: 0,
        }
    }

    /// The shape the graph was built with.
    pub(crate) fn shape(&self) -> Shape {
        self.shape
    }

    /// Node slots, removed ones included.
    pub(crate) fn len(&self) -> usize {
        self.loc.len()
    }

    /// Live nodes.
    pub(crate) fn alive(&self) -> usize {
        self.alive
    }

    /// Entry node and top level (`NO_NODE` when empty).
    pub(crate) fn entry(&self) -> (u32, usize) {
        unpack(self.entry.load(Mem::Acquire))
    }

    /// Approximate heap bytes.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.levels.capacity()
            + self.upper_off.capacity() * 8
            + (self.l0.capacity() + self.upper.capacity()) * 4
            + self.loc.capacity() * 8
            + self.stripes.capacity() * std::mem::size_of::<Mutex<()>>()
    }

    #[inline]
    fn vec_of<'a>(&self, parts: &'a [Partition], node: u32) -> Option<&'a [f32]> {
        let l = *self.loc.get(node as usize)?;
        if l.is_dead() {
            return None;
        }
        parts.get(l.part as usize).map(|p| p.row(l.row as usize))
    }

    #[inline]
    fn list(&self, node: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let w = self.shape.m0 + 1;
            let b = node as usize * w;
            &self.l0[b..b + w]
        } else {
            let w = self.shape.m + 1;
            let b = self.upper_off[node as usize] + (level - 1) * w;
            &self.upper[b..b + w]
        }
    }

    fn stripe(&self, node: u32) -> &Mutex<()> {
        &self.stripes[node as usize % STRIPES]
    }

    /// Appends node slots for `locs` and links them in, on `threads` threads.
    pub(crate) fn extend(
        &mut self,
        parts: &[Partition],
        locs: &[NodeLoc],
        threads: usize,
    ) -> Result<()> {
        let start = self.loc.len();
        if start + locs.len() >= NO_NODE as usize {
            return Err(Error::CapacityExceeded("more than 2^32 - 2 graph nodes"));
        }
        let (m, m0) = (self.shape.m, self.shape.m0);
        self.levels.reserve(locs.len());
        self.upper_off.reserve(locs.len());
        self.loc.reserve(locs.len());
        self.l0.reserve(locs.len() * (m0 + 1));
        for (i, l) in locs.iter().enumerate() {
            let node = (start + i) as u32;
            let lvl = level_for(self.shape.seed, m, node);
            self.levels.push(lvl);
            if lvl > 0 {
                self.upper_off.push(self.upper.len());
                let add = lvl as usize * (m + 1);
                self.upper.extend((0..add).map(|_| AtomicU32::new(0)));
            } else {
                self.upper_off.push(usize::MAX);
            }
            self.l0.extend((0..m0 + 1).map(|_| AtomicU32::new(0)));
            self.loc.push(*l);
        }
        self.alive += locs.len();

        let mut order: Vec<u32> = (start as u32..(start + locs.len()) as u32).collect();
        let mut state =
            splitmix(self.shape.seed ^ (start as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        for i in (1..order.len()).rev() {
            state = splitmix(state);
            let j = (state % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let Some((&first, rest)) = order.split_first() else {
            return Ok(());
        };
        let this = &*self;
        this.insert(parts, first);
        if threads <= 1 || rest.len() < 64 {
            for &n in rest {
                this.insert(parts, n);
            }
            return Ok(());
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::ThreadPool(e.to_string()))?;
        pool.install(|| rest.par_iter().for_each(|&n| this.insert(parts, n)));
        Ok(())
    }

    /// Links node `q` (whose slot exists) into the graph.
    fn insert(&self, parts: &[Partition], q: u32) {
        let Some(qv) = self.vec_of(parts, q) else {
            return;
        };
        let lq = self.levels[q as usize] as usize;
        let (mut ep, mut maxl) = self.entry();
        let mut guard = None;
        if ep == NO_NODE || lq > maxl {
            guard = Some(lock(&self.grow_lock));
            (ep, maxl) = self.entry();
            if ep == NO_NODE {
                self.entry.store(pack(q, lq), Mem::Release);
                return;
            }
            if lq <= maxl {
                guard = None;
            }
        }
        let Some(ev) = self.vec_of(parts, ep) else {
            return;
        };
        let mut cur = Scored {
            score: kernel::dot(qv, ev),
            node: ep,
        };
        for l in (lq + 1..=maxl).rev() {
            cur = self.greedy(parts, qv, cur, l);
        }
        let mut eps = vec![cur];
        let mut nbuf = Vec::with_capacity(self.shape.m0 + 1);
        for l in (0..=lq.min(maxl)).rev() {
            let mut w = self
                .search_layer(
                    parts,
                    qv,
                    &eps,
                    self.shape.ef_construction,
                    l,
                    |_| true,
                    usize::MAX,
                )
                .found;
            w.retain(|s| s.node != q);
            let sel = self.select(parts, &w, self.shape.m);
            {
                let _g = lock(self.stripe(q));
                write_list(self.list(q, l), &sel);
            }
            for &nb in &sel {
                self.link(parts, nb, q, l, &mut nbuf);
            }
            if !w.is_empty() {
                eps = w;
            }
        }
        if guard.is_some() && lq > maxl {
            self.entry.store(pack(q, lq), Mem::Release);
        }
        drop(guard);
    }

    /// Adds the edge `n -> q` on `level`, pruning `n`'s list if it is full.
    fn link(&self, parts: &[Partition], n: u32, q: u32, level: usize, ids: &mut Vec<u32>) {
        let mmax = if level == 0 {
            self.shape.m0
        } else {
            self.shape.m
        };
        let _g = lock(self.stripe(n));
        let list = self.list(n, level);
        read_list(list, ids);
        if ids.contains(&q) {
            return;
        }
        if ids.len() < mmax {
            list[1 + ids.len()].store(q, Mem::Relaxed);
            list[0].store(ids.len() as u32 + 1, Mem::Release);
            return;
        }
        let Some(nv) = self.vec_of(parts, n) else {
            return;
        };
        ids.push(q);
        let sel = self.rescore_and_select(parts, nv, ids, mmax);
        write_list(list, &sel);
    }

    /// Scores `ids` against `base`, drops dead ones, and picks up to `m` by the heuristic.
    fn rescore_and_select(
        &self,
        parts: &[Partition],
        base: &[f32],
        ids: &[u32],
        m: usize,
    ) -> Vec<u32> {
        let mut live = Vec::with_capacity(ids.len());
        let mut rows = Vec::with_capacity(ids.len());
        for &c in ids {
            if let Some(v) = self.vec_of(parts, c) {
                live.push(c);
                rows.push(v);
            }
        }
        let mut sims = vec![0.0f32; live.len()];
        kernel::dots(base, &rows, &mut sims);
        let mut scored: Vec<Scored> = live
            .iter()
            .zip(&sims)
            .map(|(&node, &score)| Scored { score, node })
            .collect();
        scored.sort_unstable_by(|a, b| b.cmp(a));
        self.select(parts, &scored, m)
    }

    /// hnswlib's neighbour heuristic: walk candidates best first and keep one
    /// only if it is closer to the base than to every candidate kept so far.
    fn select(&self, parts: &[Partition], cands: &[Scored], m: usize) -> Vec<u32> {
        if cands.len() <= m {
            return cands.iter().map(|c| c.node).collect();
        }
        let mut kept = Vec::with_capacity(m);
        let mut kept_rows: Vec<&[f32]> = Vec::with_capacity(m);
        let mut sims = vec![0.0f32; m];
        for c in cands {
            if kept.len() >= m {
                break;
            }
            let Some(cv) = self.vec_of(parts, c.node) else {
                continue;
            };
            let k = kept_rows.len();
            kernel::dots(cv, &kept_rows, &mut sims[..k]);
            if sims[..k].iter().all(|&s| s <= c.score) {
                kept.push(c.node);
                kept_rows.push(cv);
            }
        }
        kept
    }

    /// Greedy walk on an upper layer towards `q`.
    fn greedy(&self, parts: &[Partition], q: &[f32], mut cur: Scored, level: usize) -> Scored {
        let mut nbrs = Vec::with_capacity(self.shape.m + 1);
        let mut ids = Vec::with_capacity(self.shape.m + 1);
        let mut rows: Vec<&[f32]> = Vec::with_capacity(self.shape.m + 1);
        let mut sims = vec![0.0f32; self.shape.m + 1];
        loop {
            read_list(self.list(cur.node, level), &mut nbrs);
            ids.clear();
            rows.clear();
            for &nb in &nbrs {
                if (nb as usize) < self.loc.len() {
                    if let Some(v) = self.vec_of(parts, nb) {
                        ids.push(nb);
                        rows.push(v);
                    }
                }
            }
            let k = rows.len().min(sims.len());
            kernel::dots(q, &rows[..k], &mut sims[..k]);
            let mut changed = false;
            for (&node, &score) in ids.iter().zip(&sims[..k]) {
                if score > cur.score {
                    cur = Scored { score, node };
                    changed = true;
                }
            }
            if !changed {
                return cur;
            }
        }
    }

    /// Best-first beam search on one layer. Only nodes passing `allowed` enter
    /// the result set; all live nodes are traversed.
    #[allow(clippy::too_many_arguments)]
    fn search_layer<F: Fn(NodeLoc) -> bool>(
        &self,
        parts: &[Partition],
        q: &[f32],
        eps: &[Scored],
        ef: usize,
        level: usize,
        allowed: F,
        budget: usize,
    ) -> LayerOut {
        VISITED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut vis) => {
                self.search_layer_with(&mut vis, parts, q, eps, ef, level, allowed, budget)
            }
            Err(_) => {
                let mut vis = Visited {
                    tags: Vec::new(),
                    epoch: 0,
                };
                self.search_layer_with(&mut vis, parts, q, eps, ef, level, allowed, budget)
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn search_layer_with<F: Fn(NodeLoc) -> bool>(
        &self,
        vis: &mut Visited,
        parts: &[Partition],
        q: &[f32],
        eps: &[Scored],
        ef: usize,
        level: usize,
        allowed: F,
        budget: usize,
    ) -> LayerOut {
        let n = self.loc.len();
        vis.begin(n);
        let ef = ef.max(1);
        let mut cand: BinaryHeap<Scored> = BinaryHeap::with_capacity(ef * 2);
        let mut res: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(ef + 1);
        for &e in eps {
            if (e.node as usize) < n && vis.insert(e.node) {
                cand.push(e);
                if allowed(self.loc[e.node as usize]) {
                    res.push(Reverse(e));
                    if res.len() > ef {
                        res.pop();
                    }
                }
            }
        }
        let width = if level == 0 {
            self.shape.m0
        } else {
            self.shape.m
        };
        let mut nbrs = Vec::with_capacity(width + 1);
        let mut ids = Vec::with_capacity(width + 1);
        let mut rows: Vec<&[f32]> = Vec::with_capacity(width + 1);
        let mut sims = vec![0.0f32; width + 1];
        let mut out = LayerOut::default();
        while let Some(c) = cand.pop() {
            if res.len() >= ef {
                if let Some(Reverse(w)) = res.peek() {
                    if c.score < w.score {
                        break;
                    }
                }
            }
            read_list(self.list(c.node, level), &mut nbrs);
            ids.clear();
            rows.clear();
            for &nb in &nbrs {
                if (nb as usize) < n && vis.insert(nb) {
                    if let Some(v) = self.vec_of(parts, nb) {
                        ids.push(nb);
                        rows.push(v);
                    }
                }
            }
            if ids.is_empty() {
                continue;
            }
            let k = rows.len().min(sims.len());
            kernel::dots(q, &rows[..k], &mut sims[..k]);
            out.evals += k;
            for (&node, &score) in ids.iter().zip(&sims[..k]) {
                let floor = match res.peek() {
                    Some(Reverse(w)) if res.len() >= ef => w.score,
                    _ => f32::NEG_INFINITY,
                };
                if score > floor {
                    let s = Scored { score, node };
                    cand.push(s);
                    if allowed(self.loc[node as usize]) {
                        res.push(Reverse(s));
                        if res.len() > ef {
                            res.pop();
                        }
                    }
                }
            }
            if out.evals > budget {
                out.aborted = true;
                break;
            }
        }
        out.found = res.into_iter().map(|r| r.0).collect();
        out.found.sort_unstable_by(|a, b| b.cmp(a));
        out
    }

    /// Query search: greedy descent, then a filtered layer-0 beam of width `ef`.
    /// `allowed` is a bitset over dense partition indices (`None`: all).
    pub(crate) fn search(
        &self,
        parts: &[Partition],
        q: &[f32],
        ef: usize,
        allowed: Option<&[u64]>,
        budget: usize,
    ) -> LayerOut {
        let (ep, maxl) = self.entry();
        let Some(ev) = (ep != NO_NODE).then(|| self.vec_of(parts, ep)).flatten() else {
            return LayerOut::default();
        };
        let mut cur = Scored {
            score: kernel::dot(q, ev),
            node: ep,
        };
        let mut evals = 1;
        for l in (1..=maxl).rev() {
            cur = self.greedy(parts, q, cur, l);
            evals += self.shape.m;
        }
        let mut out = match allowed {
            None => self.search_layer(parts, q, &[cur], ef, 0, |_| true, budget),
            Some(bits) => self.search_layer(
                parts,
                q,
                &[cur],
                ef,
                0,
                |l: NodeLoc| {
                    let p = l.part as usize;
                    bits.get(p / 64).is_some_and(|w| w >> (p % 64) & 1 == 1)
                },
                budget,
            ),
        };
        out.evals += evals;
        out
    }

    /// Removes node `d`: repairs the lists of neighbours that linked to it,
    /// clears its own lists and marks it dead. Its vector is not read.
    pub(crate) fn remove(&mut self, parts: &[Partition], d: u32) {
        let Some(&l) = self.loc.get(d as usize) else {
            return;
        };
        if l.is_dead() {
            return;
        }
        self.loc[d as usize] = NodeLoc::DEAD;
        self.alive -= 1;
        let n = self.loc.len();
        let mut nd = Vec::new();
        let mut ul = Vec::new();
        for level in 0..=self.levels[d as usize] as usize {
            let mmax = if level == 0 {
                self.shape.m0
            } else {
                self.shape.m
            };
            read_list(self.list(d, level), &mut nd);
            nd.retain(|&u| (u as usize) < n && u != d && !self.loc[u as usize].is_dead());
            for &u in &nd {
                read_list(self.list(u, level), &mut ul);
                if !ul.contains(&d) {
                    continue;
                }
                let Some(uv) = self.vec_of(parts, u) else {
                    continue;
                };
                let mut cands: Vec<u32> =
                    ul.iter().copied().filter(|&x| x != d && x != u).collect();
                for &x in &nd {
                    if x != u && !cands.contains(&x) {
                        cands.push(x);
                    }
                }
                let sel = self.rescore_and_select(parts, uv, &cands, mmax);
                write_list(self.list(u, level), &sel);
            }
            write_list(self.list(d, level), &[]);
        }
        let (ep, _) = self.entry();
        if ep == d {
            let mut best = (NO_NODE, 0usize);
            for (i, loc) in self.loc.iter().enumerate() {
                let lv = self.levels[i] as usize;
                if !loc.is_dead() && (best.0 == NO_NODE || lv > best.1) {
                    best = (i as u32, lv);
                }
            }
            self.entry.store(pack(best.0, best.1), Mem::Release);
        }
    }

    // ---- persistence support -------------------------------------------------

    /// Per-node levels.
    pub(crate) fn levels(&self) -> &[u8] {
        &self.levels
    }

    /// Layer-0 lists as raw words (`m0 + 1` per node: count, ids).
    pub(crate) fn l0_words(&self) -> impl Iterator<Item = u32> + '_ {
        self.l0.iter().map(|a| a.load(Mem::Relaxed))
    }

    /// Upper-layer lists as raw words, in node order.
    pub(crate) fn upper_words(&self) -> impl Iterator<Item = u32> + '_ {
        self.upper.iter().map(|a| a.load(Mem::Relaxed))
    }

    /// Rebuilds a graph from persisted parts, checking every invariant that
    /// traversal relies on. Returns a description of the first violation.
    pub(crate) fn from_raw(
        shape: Shape,
        levels: Vec<u8>,
        l0: Vec<u32>,
        upper: Vec<u32>,
        loc: Vec<NodeLoc>,
        entry: (u32, usize),
    ) -> std::result::Result<Self, String> {
        let n = levels.len();
        if loc.len() != n {
            return Err("node table length mismatch".into());
        }
        if l0.len() != n * (shape.m0 + 1) {
            return Err("layer-0 table length mismatch".into());
        }
        let mut upper_off = Vec::with_capacity(n);
        let mut off = 0usize;
        for &lv in &levels {
            if lv as usize > MAX_LEVEL {
                return Err("node level out of range".into());
            }
            if lv == 0 {
                upper_off.push(usize::MAX);
            } else {
                upper_off.push(off);
                off += lv as usize * (shape.m + 1);
            }
        }
        if upper.len() != off {
            return Err("upper-layer table length mismatch".into());
        }
        let check = |words: &[u32],
                     w: usize,
                     cap: usize,
                     min_level: usize|
         -> std::result::Result<(), String> {
            for list in words.chunks(w) {
                let c = list[0] as usize;
                if c > cap {
                    return Err("neighbour count exceeds capacity".into());
                }
                for &id in &list[1..=c] {
                    if id as usize >= n {
                        return Err("neighbour id out of range".into());
                    }
                    if (levels[id as usize] as usize) < min_level {
                        return Err("neighbour missing from the layer".into());
                    }
                }
            }
            Ok(())
        };
        check(&l0, shape.m0 + 1, shape.m0, 0)?;
        for (i, &lv) in levels.iter().enumerate() {
            for level in 1..=lv as usize {
                let b = upper_off[i] + (level - 1) * (shape.m + 1);
                check(&upper[b..b + shape.m + 1], shape.m + 1, shape.m, level)?;
            }
        }
        let alive = loc.iter().filter(|l| !l.is_dead()).count();
        let (ep, maxl) = entry;
        if ep == NO_NODE {
            if alive != 0 {
                return Err("graph has live nodes but no entry point".into());
            }
        } else if ep as usize >= n
            || loc[ep as usize].is_dead()
            || levels[ep as usize] as usize != maxl
        {
            return Err("invalid entry point".into());
        }
        Ok(Self {
            shape,
            levels,
            upper_off,
            l0: l0.into_iter().map(AtomicU32::new).collect(),
            upper: upper.into_iter().map(AtomicU32::new).collect(),
            loc,
            entry: AtomicU64::new(pack(ep, maxl)),
            grow_lock: Mutex::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            alive,
        })
    }
}
