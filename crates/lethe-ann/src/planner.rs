//! Per-query choice between the exact scan and the graph, by a measured cost model.
//!
//! Both costs are predicted in nanoseconds from quantities known before the
//! search starts:
//!
//! * exact scan: the bytes of the allowed rows it streams (the `i8` copies
//!   when at least `quantized_min_rows` rows are allowed, the `f32` rows
//!   otherwise). The first `scan_hot_bytes` of them run at cache speed
//!   (`scan_ns_per_byte_hot`), the rest at memory speed
//!   (`scan_ns_per_byte_cold`); plus `exact_ns_per_partition` per allowed
//!   partition and `exact_ns_fixed` per query;
//! * graph: `evals = (graph_evals_per_ef × ef + graph_evals_fixed) ×
//!   selectivity^-graph_selectivity_exponent` distance evaluations at
//!   `graph_ns_per_float` per float each, plus the exact scan of allowed rows
//!   that are not in the graph yet. A filtered search must collect `ef`
//!   *allowed* nodes, so it evaluates more nodes as the allowed fraction
//!   falls; the measured growth is a power law with exponent 0.84 (not 1:
//!   the walk stays near the query, where allowed nodes are found at the
//!   same rate).
//!
//! The defaults were fitted on the reference machine (2-vCPU AMD EPYC, 32 MiB
//! L3) by `examples/bench_retrieval.rs`, which measures both routes at eleven
//! selectivities on 100k × 384 embedding-like vectors and writes the fitted
//! per-byte and per-evaluation costs to its JSON (`cost_fit`). The constants
//! only steer speed: whichever route is taken, the exact route is exact and
//! the graph route falls back to it when it cannot deliver `k` allowed hits.

/// Constants of the cost model. See the module documentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlannerParams {
    /// Nanoseconds per byte streamed by the exact scan while cache-resident.
    pub scan_ns_per_byte_hot: f64,
    /// Nanoseconds per byte streamed by the exact scan from memory.
    pub scan_ns_per_byte_cold: f64,
    /// Bytes of allowed rows that stay cache-resident between queries.
    pub scan_hot_bytes: f64,
    /// Fixed nanoseconds per allowed partition on the exact route.
    pub exact_ns_per_partition: f64,
    /// Fixed nanoseconds per query on the exact route.
    pub exact_ns_fixed: f64,
    /// From this many allowed rows on, the exact route scans the `i8` copies
    /// and re-scores the few rows whose error bound reaches the top k.
    pub quantized_min_rows: usize,
    /// Nanoseconds per float of one graph distance evaluation (random access).
    pub graph_ns_per_float: f64,
    /// Distance evaluations of an unfiltered graph search per unit of `ef`.
    pub graph_evals_per_ef: f64,
    /// Fixed distance evaluations of an unfiltered graph search.
    pub graph_evals_fixed: f64,
    /// Evaluations grow as `selectivity^-exponent` under a filter.
    pub graph_selectivity_exponent: f64,
    /// Beam width of graph searches (raised to `k` when `k` is larger).
    pub ef: usize,
    /// A graph search that needs more than this many times its predicted
    /// evaluations is abandoned for the exact scan.
    pub budget_factor: f64,
}

impl Default for PlannerParams {
    /// The constants measured on the reference machine (module docs); `ef`
    /// 192 gives recall@10 0.97-0.98 unfiltered on the benchmark data.
    fn default() -> Self {
        Self {
            scan_ns_per_byte_hot: 0.025,
            scan_ns_per_byte_cold: 0.12,
            scan_hot_bytes: 8.0 * 1024.0 * 1024.0,
            exact_ns_per_partition: 150.0,
            exact_ns_fixed: 2000.0,
            quantized_min_rows: 512,
            graph_ns_per_float: 0.5,
            graph_evals_per_ef: 18.0,
            graph_evals_fixed: 330.0,
            graph_selectivity_exponent: 0.84,
            ef: 192,
            budget_factor: 4.0,
        }
    }
}

/// The route a search takes (or took).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Exact scan of the allowed partitions.
    Exact,
    /// Filtered graph search, plus an exact scan of allowed pending vectors.
    Graph,
    /// The graph search could not deliver `k` allowed hits within its budget,
    /// and the exact scan answered instead.
    GraphThenExact,
}

/// What the planner decided for one query shape, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// The chosen route ([`Route::Exact`] or [`Route::Graph`]).
    pub route: Route,
    /// Vectors the filter allows.
    pub allowed: usize,
    /// Fraction of live graph nodes the filter allows (0 without a graph).
    pub selectivity: f64,
    /// Predicted cost of the exact scan, nanoseconds.
    pub exact_cost_ns: f64,
    /// Predicted cost of the graph route, nanoseconds (`None` without a graph).
    pub graph_cost_ns: Option<f64>,
    /// Beam width the graph route uses.
    pub ef: usize,
    /// Distance evaluations after which the graph route gives up.
    pub budget: usize,
}

/// Counts the planner needs about one filter.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Demand {
    pub(crate) k: usize,
    /// Floats per stored row (graph distance cost).
    pub(crate) stride: usize,
    /// Bytes the exact route streams.
    pub(crate) exact_bytes: f64,
    /// Bytes of allowed rows not yet in the graph.
    pub(crate) pending_bytes: f64,
    pub(crate) allowed: usize,
    pub(crate) allowed_indexed: usize,
    pub(crate) partitions: usize,
    /// Live graph nodes, `None` without a graph.
    pub(crate) graph_alive: Option<usize>,
}

impl PlannerParams {
    /// Whether every constant is finite and in range.
    pub(crate) fn is_valid(&self) -> bool {
        let pos = |x: f64| x.is_finite() && x >= 0.0;
        pos(self.scan_ns_per_byte_hot)
            && pos(self.scan_ns_per_byte_cold)
            && pos(self.scan_hot_bytes)
            && pos(self.exact_ns_per_partition)
            && pos(self.exact_ns_fixed)
            && pos(self.graph_selectivity_exponent)
            && pos(self.graph_ns_per_float)
            && pos(self.graph_evals_per_ef)
            && pos(self.graph_evals_fixed)
            && self.budget_factor.is_finite()
            && self.budget_factor >= 1.0
            && self.ef >= 1
    }

    /// Predicted nanoseconds to stream `bytes` of stored rows.
    fn scan_ns(&self, bytes: f64) -> f64 {
        let hot = self.scan_hot_bytes.min(bytes);
        hot * self.scan_ns_per_byte_hot + (bytes - hot) * self.scan_ns_per_byte_cold
    }

    /// Decides the route for one query.
    pub(crate) fn plan(&self, d: &Demand) -> Plan {
        let stride = d.stride as f64;
        let exact = self.scan_ns(d.exact_bytes)
            + d.partitions as f64 * self.exact_ns_per_partition
            + self.exact_ns_fixed;
        let ef = self.ef.max(d.k);
        let mut plan = Plan {
            route: Route::Exact,
            allowed: d.allowed,
            selectivity: 0.0,
            exact_cost_ns: exact,
            graph_cost_ns: None,
            ef,
            budget: 0,
        };
        let Some(alive) = d.graph_alive.filter(|&a| a > 0) else {
            return plan;
        };
        let s = d.allowed_indexed as f64 / alive as f64;
        plan.selectivity = s;
        // The graph can only help when it holds more allowed vectors than the
        // beam needs; below that the exact scan is both exact and cheaper.
        if d.allowed_indexed <= ef {
            return plan;
        }
        let evals = (self.graph_evals_per_ef * ef as f64 + self.graph_evals_fixed)
            * s.powf(-self.graph_selectivity_exponent);
        let graph = evals * stride * self.graph_ns_per_float + self.scan_ns(d.pending_bytes);
        plan.graph_cost_ns = Some(graph);
        plan.budget = (evals * self.budget_factor).ceil().min(usize::MAX as f64) as usize;
        if graph < exact {
            plan.route = Route::Graph;
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(allowed: usize, alive: Option<usize>) -> Demand {
        Demand {
            k: 10,
            stride: 384,
            exact_bytes: allowed as f64 * 384.0,
            pending_bytes: 0.0,
            allowed,
            allowed_indexed: allowed,
            partitions: 10,
            graph_alive: alive,
        }
    }

    #[test]
    fn no_graph_means_exact() {
        let p = PlannerParams::default().plan(&demand(100_000, None));
        assert_eq!(p.route, Route::Exact);
        assert!(p.graph_cost_ns.is_none());
    }

    #[test]
    fn large_allowed_sets_use_the_graph_and_small_ones_scan() {
        let params = PlannerParams::default();
        let all = params.plan(&demand(100_000, Some(100_000)));
        assert_eq!(all.route, Route::Graph);
        let tiny = params.plan(&demand(100, Some(100_000)));
        assert_eq!(tiny.route, Route::Exact);
        // Cost is monotone: once the graph wins at some size it wins above it.
        let mut seen_graph = false;
        for allowed in (1..=100).map(|i| i * 1000) {
            let route = params.plan(&demand(allowed, Some(100_000))).route;
            if seen_graph {
                assert_eq!(
                    route,
                    Route::Graph,
                    "exact chosen at {allowed} above a graph choice"
                );
            }
            seen_graph |= route == Route::Graph;
        }
        assert!(seen_graph);
    }
}
