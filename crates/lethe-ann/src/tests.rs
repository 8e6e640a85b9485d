//! Behaviour tests of the whole index: exactness against brute force,
//! erasure, persistence, corruption handling, input validation, graph recall.
//!
//! Sizes follow `LETHE_TEST_SIZE` (`small` by default, `full` for larger
//! corpora); every test runs at both sizes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::persist::FILE_NAME;
use crate::{
    sort_hits, Error, Filter, GraphParams, Hit, Route, SearchOptions, Strategy, VectorIndex,
};

fn full_size() -> bool {
    std::env::var("LETHE_TEST_SIZE").is_ok_and(|v| v == "full")
}

/// Low-rank-plus-noise vectors like sentence embeddings (anchors.md §4).
struct Gen {
    rng: StdRng,
    a: Vec<f32>,
    dim: usize,
    rank: usize,
}

impl Gen {
    fn new(seed: u64, dim: usize, rank: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = Normal::new(0.0f32, 1.0).unwrap();
        let s = 1.0 / (rank as f32).sqrt();
        let a = (0..dim * rank).map(|_| n.sample(&mut rng) * s).collect();
        Self { rng, a, dim, rank }
    }

    fn vector(&mut self) -> Vec<f32> {
        let n = Normal::new(0.0f32, 1.0).unwrap();
        let z: Vec<f32> = (0..self.rank).map(|_| n.sample(&mut self.rng)).collect();
        (0..self.dim)
            .map(|i| {
                let row = &self.a[i * self.rank..(i + 1) * self.rank];
                row.iter().zip(&z).map(|(p, q)| p * q).sum::<f32>() + 0.1 * n.sample(&mut self.rng)
            })
            .collect()
    }
}

/// Test-side mirror of what the index should contain.
struct Corpus {
    index: VectorIndex,
    /// key -> (partition, raw vector as inserted)
    items: HashMap<u64, (u32, Vec<f32>)>,
}

impl Corpus {
    fn random(seed: u64, n: usize, dim: usize, partitions: u32) -> Self {
        let mut g = Gen::new(seed, dim, 8.min(dim));
        let mut rng = StdRng::seed_from_u64(seed ^ 0xABCD);
        let mut index = VectorIndex::new(dim).unwrap();
        let mut items = HashMap::new();
        for i in 0..n {
            // Scattered keys, skewed partition sizes.
            let key = (i as u64).wrapping_mul(0x9E37_79B9) ^ 0x5555;
            let p = (rng.random::<f64>().powi(2) * partitions as f64) as u32 * 3 + 1;
            let mut v = g.vector();
            let scale: f32 = rng.random_range(0.1..10.0);
            v.iter_mut().for_each(|x| *x *= scale);
            index.insert(key, p, &v).unwrap();
            items.insert(key, (p, v));
        }
        Self { index, items }
    }

    fn partitions(&self) -> Vec<u32> {
        let mut p: Vec<u32> = self.items.values().map(|(p, _)| *p).collect();
        p.sort_unstable();
        p.dedup();
        p
    }

    /// Exact top-k by the index's own scoring of each allowed key.
    fn brute(&self, q: &[f32], k: usize, filter: &Filter) -> Vec<Hit> {
        let mut all: Vec<Hit> = self
            .items
            .iter()
            .filter(|(_, (p, _))| filter.allows(*p))
            .map(|(&key, _)| Hit {
                key,
                score: self.index.score(q, key).unwrap().unwrap(),
            })
            .collect();
        sort_hits(&mut all);
        all.truncate(k);
        all
    }

    fn random_filter(&self, rng: &mut StdRng) -> Filter {
        let parts = self.partitions();
        match rng.random_range(0..10) {
            0 => Filter::all(),
            1 => Filter::none(),
            _ => {
                let take = rng.random_range(1..=parts.len());
                let mut chosen: Vec<u32> = parts.choose_multiple(rng, take).copied().collect();
                if rng.random_bool(0.3) {
                    chosen.push(999_999); // unknown ids match nothing
                }
                Filter::partitions(&chosen)
            }
        }
    }
}

fn f64_cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn check_exact(c: &Corpus, rng: &mut StdRng, g: &mut Gen, rounds: usize) {
    for _ in 0..rounds {
        let q = g.vector();
        let k = *[1usize, 3, 10, 25].choose(rng).unwrap();
        let filter = c.random_filter(rng);
        let opts = SearchOptions {
            strategy: Strategy::Exact,
            ef: None,
        };
        let out = c.index.search_with(&q, k, &filter, &opts).unwrap();
        assert_eq!(out.route, Route::Exact);
        let want = c.brute(&q, k, &filter);
        assert_eq!(out.hits, want, "filter {filter:?} k {k}");
        for h in &out.hits {
            let (p, v) = &c.items[&h.key];
            assert!(filter.allows(*p));
            assert!((f64_cosine(&q, v) - h.score as f64).abs() < 1e-5);
        }
    }
}

#[test]
fn exact_search_equals_brute_force_over_random_filters() {
    let (n, rounds) = if full_size() {
        (5000, 400)
    } else {
        (1200, 150)
    };
    for (seed, dim, parts) in [
        (1u64, 24usize, 40u32),
        (2, 100, 7),
        (3, 5, 200),
        (4, 384, 30),
    ] {
        let mut c = Corpus::random(seed, n, dim, parts);
        let mut rng = StdRng::seed_from_u64(seed + 100);
        let mut g = Gen::new(seed + 200, dim, 8.min(dim));
        // Both exact scans: f32 rows only, and i8 bounds plus f32 re-scoring.
        for min_rows in [usize::MAX, 0] {
            let mut p = c.index.planner();
            p.quantized_min_rows = min_rows;
            c.index.set_planner(p).unwrap();
            check_exact(&c, &mut rng, &mut g, rounds);
        }
    }
}

#[test]
fn auto_route_is_exact_whenever_it_scans() {
    let c = {
        let mut c = Corpus::random(7, if full_size() { 6000 } else { 2000 }, 32, 30);
        c.index.build_graph(&GraphParams::default()).unwrap();
        c
    };
    let mut rng = StdRng::seed_from_u64(8);
    let mut g = Gen::new(9, 32, 8);
    let mut seen = HashSet::new();
    for _ in 0..200 {
        let q = g.vector();
        let filter = c.random_filter(&mut rng);
        let out = c
            .index
            .search_with(&q, 10, &filter, &SearchOptions::default())
            .unwrap();
        seen.insert(out.route);
        if out.route == Route::Exact {
            assert_eq!(out.hits, c.brute(&q, 10, &filter));
        } else {
            let allowed: usize = c.items.values().filter(|(p, _)| filter.allows(*p)).count();
            assert_eq!(out.hits.len(), allowed.min(10));
            assert!(out.hits.iter().all(|h| filter.allows(c.items[&h.key].0)));
        }
    }
    assert!(
        seen.contains(&Route::Exact),
        "planner never scanned: {seen:?}"
    );
}

#[test]
fn k_beyond_allowed_returns_every_allowed_vector_in_order() {
    let c = Corpus::random(11, 300, 16, 20);
    let mut g = Gen::new(12, 16, 8);
    let parts = c.partitions();
    let filter = Filter::partitions(&parts[..2]);
    let allowed: HashSet<u64> = c
        .items
        .iter()
        .filter(|(_, (p, _))| filter.allows(*p))
        .map(|(k, _)| *k)
        .collect();
    let q = g.vector();
    let hits = c.index.search(&q, allowed.len() + 50, &filter).unwrap();
    assert_eq!(hits.len(), allowed.len());
    assert_eq!(hits.iter().map(|h| h.key).collect::<HashSet<_>>(), allowed);
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
}

#[test]
fn empty_filter_zero_k_and_unknown_partitions_return_nothing() {
    let mut c = Corpus::random(13, 200, 8, 10);
    c.index.build_graph(&GraphParams::default()).unwrap();
    let q = Gen::new(14, 8, 8).vector();
    for strategy in [Strategy::Auto, Strategy::Exact, Strategy::Graph] {
        let opts = SearchOptions { strategy, ef: None };
        assert!(c
            .index
            .search_with(&q, 10, &Filter::none(), &opts)
            .unwrap()
            .hits
            .is_empty());
        assert!(c
            .index
            .search_with(&q, 10, &Filter::partitions(&[0, 2, 77_777]), &opts)
            .unwrap()
            .hits
            .is_empty());
        assert!(c
            .index
            .search_with(&q, 0, &Filter::all(), &opts)
            .unwrap()
            .hits
            .is_empty());
    }
    let empty = VectorIndex::new(8).unwrap();
    assert!(empty.search(&q, 5, &Filter::all()).unwrap().is_empty());
}

#[test]
fn ties_are_broken_by_ascending_key_and_results_are_deterministic() {
    let mut index = VectorIndex::new(4).unwrap();
    for key in [40u64, 7, 19, 3, 25] {
        index.insert(key, 1, &[1.0, 2.0, 3.0, 4.0]).unwrap();
    }
    index.insert(100, 2, &[-1.0, 0.0, 0.0, 0.0]).unwrap();
    let q = [1.0, 2.0, 3.0, 4.0];
    let hits = index.search(&q, 4, &Filter::all()).unwrap();
    assert_eq!(
        hits.iter().map(|h| h.key).collect::<Vec<_>>(),
        vec![3, 7, 19, 25]
    );
    assert!(hits.iter().all(|h| h.score == hits[0].score));
    assert!((hits[0].score - 1.0).abs() < 1e-6);
    assert_eq!(index.search(&q, 4, &Filter::all()).unwrap(), hits);
}

#[test]
fn invalid_vectors_and_duplicate_keys_are_rejected() {
    let mut index = VectorIndex::new(3).unwrap();
    assert!(matches!(
        index.insert(1, 0, &[1.0, 2.0]),
        Err(Error::DimensionMismatch {
            expected: 3,
            got: 2
        })
    ));
    assert!(matches!(
        index.insert(1, 0, &[1.0, f32::NAN, 2.0]),
        Err(Error::NonFinite { position: 1 })
    ));
    assert!(matches!(
        index.insert(1, 0, &[f32::INFINITY, 0.0, 2.0]),
        Err(Error::NonFinite { position: 0 })
    ));
    assert!(matches!(
        index.insert(1, 0, &[0.0; 3]),
        Err(Error::ZeroVector)
    ));
    assert!(index.is_empty());
    index.insert(1, 0, &[1.0, 0.0, 0.0]).unwrap();
    assert!(matches!(
        index.insert(1, 5, &[0.0, 1.0, 0.0]),
        Err(Error::DuplicateKey(1))
    ));
    assert_eq!(index.len(), 1);
    assert!(matches!(
        index.search(&[1.0; 4], 1, &Filter::all()),
        Err(Error::DimensionMismatch {
            expected: 3,
            got: 4
        })
    ));
    assert!(matches!(
        index.search(&[1.0, f32::NAN, 0.0], 1, &Filter::all()),
        Err(Error::NonFinite { position: 1 })
    ));
    assert!(matches!(VectorIndex::new(0), Err(Error::InvalidParams(_))));
    let bad = GraphParams {
        m: 1,
        ..GraphParams::default()
    };
    assert!(matches!(
        index.build_graph(&bad),
        Err(Error::InvalidParams(_))
    ));
    assert!(matches!(
        index.extend_graph(2),
        Err(Error::InvalidParams(_))
    ));
    // A vector whose components underflow after normalisation is still fine;
    // one that is tiny but non-zero keeps its direction.
    index.insert(2, 0, &[1e-30, 0.0, 0.0]).unwrap();
    let v = index.vector(2).unwrap();
    assert!((v[0] - 1.0).abs() < 1e-6);
}

/// Removes `victims`, then checks that no search route returns them, the
/// arena's memory holds no copy of their bytes, and exact search still
/// equals brute force.
#[test]
fn removal_erases_vectors_from_results_memory_and_graph() {
    let n = if full_size() { 4000 } else { 1500 };
    let mut c = Corpus::random(21, n, 24, 25);
    c.index.build_graph(&GraphParams::default()).unwrap();
    // Some pending vectors too, inserted after the build.
    let mut g = Gen::new(22, 24, 8);
    for i in 0..100u64 {
        let v = g.vector();
        let key = 1_000_000 + i;
        c.index.insert(key, (i % 5) as u32 * 3 + 1, &v).unwrap();
        c.items.insert(key, ((i % 5) as u32 * 3 + 1, v));
    }
    let mut keys: Vec<u64> = c.items.keys().copied().collect();
    keys.sort_unstable();
    let mut rng = StdRng::seed_from_u64(23);
    keys.shuffle(&mut rng);
    let victims: Vec<u64> = keys[..n / 3].to_vec();
    let stored: Vec<Vec<f32>> = victims
        .iter()
        .map(|k| c.index.vector(*k).unwrap().to_vec())
        .collect();
    for s in &stored {
        assert!(
            c.index.memory_contains(s),
            "precondition: the stored vector is in memory"
        );
    }
    for &v in &victims {
        assert!(c.index.remove(v));
        assert!(!c.index.remove(v));
        c.items.remove(&v);
    }
    assert_eq!(c.index.len(), c.items.len());
    for (k, s) in victims.iter().zip(&stored) {
        assert!(!c.index.contains(*k) && c.index.vector(*k).is_none());
        assert!(
            !c.index.memory_contains(s),
            "bytes of removed key {k} remain in memory"
        );
    }
    let status = c.index.graph_status();
    assert!(status.built && !status.is_fresh());
    assert_eq!(status.nodes + status.pending, c.items.len());
    let gone: HashSet<u64> = victims.iter().copied().collect();
    for s in stored.iter().take(50) {
        // Query with the removed vector itself: it must never come back.
        for strategy in [Strategy::Exact, Strategy::Graph, Strategy::Auto] {
            let out = c
                .index
                .search_with(s, 20, &Filter::all(), &SearchOptions { strategy, ef: None })
                .unwrap();
            assert!(out.hits.iter().all(|h| !gone.contains(&h.key)));
            assert_eq!(out.hits.len(), 20);
        }
    }
    check_exact(&c, &mut rng, &mut g, 100);
    let mut p = c.index.planner();
    p.quantized_min_rows = 0;
    c.index.set_planner(p).unwrap();
    check_exact(&c, &mut rng, &mut g, 100);
    // Rebuilding clears tombstones and pending.
    c.index.build_graph(&GraphParams::default()).unwrap();
    assert!(c.index.graph_status().is_fresh());
    check_exact(&c, &mut rng, &mut g, 30);
}

#[test]
fn removing_everything_leaves_an_empty_working_index() {
    let mut c = Corpus::random(31, 300, 8, 6);
    c.index.build_graph(&GraphParams::default()).unwrap();
    let keys: Vec<u64> = c.items.keys().copied().collect();
    for k in keys {
        assert!(c.index.remove(k));
    }
    assert!(c.index.is_empty());
    let q = Gen::new(32, 8, 8).vector();
    for strategy in [Strategy::Exact, Strategy::Graph] {
        let out = c
            .index
            .search_with(&q, 5, &Filter::all(), &SearchOptions { strategy, ef: None })
            .unwrap();
        assert!(out.hits.is_empty());
    }
    assert_eq!(c.index.graph_status().nodes, 0);
    c.index.insert(5, 1, &q).unwrap();
    assert_eq!(c.index.search(&q, 5, &Filter::all()).unwrap()[0].key, 5);
    c.index.extend_graph(1).unwrap();
    let out = c
        .index
        .search_with(
            &q,
            5,
            &Filter::all(),
            &SearchOptions {
                strategy: Strategy::Graph,
                ef: None,
            },
        )
        .unwrap();
    assert_eq!(out.route, Route::Graph);
    assert_eq!(out.hits[0].key, 5);
}

#[test]
fn pending_vectors_are_found_on_the_graph_route_and_extend_indexes_them() {
    let mut c = Corpus::random(41, 1500, 16, 10);
    c.index.build_graph(&GraphParams::default()).unwrap();
    assert!(c.index.graph_status().is_fresh());
    let mut g = Gen::new(42, 16, 8);
    let fresh: Vec<(u64, Vec<f32>)> = (0..40).map(|i| (500_000 + i, g.vector())).collect();
    for (k, v) in &fresh {
        c.index.insert(*k, 4, v).unwrap();
    }
    assert_eq!(c.index.graph_status().pending, 40);
    let graph = SearchOptions {
        strategy: Strategy::Graph,
        ef: None,
    };
    for (k, v) in &fresh {
        let out = c
            .index
            .search_with(v, 1, &Filter::partitions(&[4]), &graph)
            .unwrap();
        assert_eq!(out.route, Route::Graph);
        assert_eq!(out.hits[0].key, *k);
    }
    c.index.extend_graph(2).unwrap();
    let status = c.index.graph_status();
    assert!(status.is_fresh());
    assert_eq!(status.nodes, 1540);
    for (k, v) in &fresh {
        let out = c.index.search_with(v, 1, &Filter::all(), &graph).unwrap();
        assert_eq!(out.route, Route::Graph);
        assert_eq!(out.hits[0].key, *k);
    }
}

fn recall(
    index: &VectorIndex,
    c_items: &HashMap<u64, (u32, Vec<f32>)>,
    queries: &[Vec<f32>],
    filter: &Filter,
    ef: usize,
) -> f64 {
    let mut found = 0;
    let mut total = 0;
    for q in queries {
        let exact = index
            .search_with(
                q,
                10,
                filter,
                &SearchOptions {
                    strategy: Strategy::Exact,
                    ef: None,
                },
            )
            .unwrap();
        let approx = index
            .search_with(
                q,
                10,
                filter,
                &SearchOptions {
                    strategy: Strategy::Graph,
                    ef: Some(ef),
                },
            )
            .unwrap();
        assert_eq!(approx.route, Route::Graph);
        assert!(approx.hits.iter().all(|h| filter.allows(c_items[&h.key].0)));
        let got: HashSet<u64> = approx.hits.iter().map(|h| h.key).collect();
        found += exact.hits.iter().filter(|h| got.contains(&h.key)).count();
        total += exact.hits.len();
    }
    found as f64 / total as f64
}

#[test]
fn graph_route_recall_is_at_least_095_on_embedding_like_vectors() {
    let (n, dim) = if full_size() {
        (20_000, 384)
    } else {
        (4000, 128)
    };
    let mut g = Gen::new(51, dim, 32);
    let mut index = VectorIndex::new(dim).unwrap();
    let mut items = HashMap::new();
    for i in 0..n as u64 {
        let v = g.vector();
        let p = (i % 20) as u32;
        index.insert(i, p, &v).unwrap();
        items.insert(i, (p, v));
    }
    index.build_graph(&GraphParams::default()).unwrap();
    let queries: Vec<Vec<f32>> = (0..100).map(|_| g.vector()).collect();
    // The planner's beam, and a tight one (1.2 % / 0.5 % of the nodes) at
    // which the graph is far from an exhaustive search.
    let tight = if full_size() { 96 } else { 48 };
    for ef in [index.planner().ef, tight] {
        let all = recall(&index, &items, &queries, &Filter::all(), ef);
        assert!(all >= 0.95, "unfiltered recall {all} at ef {ef}");
        let half: Vec<u32> = (0..10).collect();
        let filtered = recall(&index, &items, &queries, &Filter::partitions(&half), ef);
        assert!(
            filtered >= 0.95,
            "50 % filtered recall {filtered} at ef {ef}"
        );
    }
    let ef = tight;
    // After erasing 10 %, the repaired graph keeps its recall.
    for k in (0..n as u64).step_by(10) {
        index.remove(k);
        items.remove(&k);
    }
    let after = recall(&index, &items, &queries, &Filter::all(), ef);
    assert!(after >= 0.95, "recall after removals {after}");
}

#[test]
fn searches_from_many_threads_agree_with_sequential_results() {
    let mut c = Corpus::random(61, 2000, 32, 12);
    c.index.build_graph(&GraphParams::default()).unwrap();
    let mut g = Gen::new(62, 32, 8);
    let mut rng = StdRng::seed_from_u64(63);
    let cases: Vec<(Vec<f32>, Filter, SearchOptions)> = (0..64)
        .map(|i| {
            let strategy = [Strategy::Auto, Strategy::Exact, Strategy::Graph][i % 3];
            (
                g.vector(),
                c.random_filter(&mut rng),
                SearchOptions { strategy, ef: None },
            )
        })
        .collect();
    let run = |index: &VectorIndex, (q, f, o): &(Vec<f32>, Filter, SearchOptions)| {
        index.search_with(q, 10, f, o).unwrap()
    };
    let expected: Vec<_> = cases.iter().map(|case| run(&c.index, case)).collect();
    let index = &c.index;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let cases = &cases;
                let expected = &expected;
                s.spawn(move || {
                    for (i, case) in cases.iter().enumerate().skip(t) {
                        assert_eq!(run(index, case), expected[i]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
}

fn all_results(index: &VectorIndex, cases: &[(Vec<f32>, Filter)]) -> Vec<(Vec<Hit>, Vec<Hit>)> {
    cases
        .iter()
        .map(|(q, f)| {
            let e = SearchOptions {
                strategy: Strategy::Exact,
                ef: None,
            };
            let gr = SearchOptions {
                strategy: Strategy::Graph,
                ef: None,
            };
            (
                index.search_with(q, 10, f, &e).unwrap().hits,
                index.search_with(q, 10, f, &gr).unwrap().hits,
            )
        })
        .collect()
}

#[test]
fn save_load_round_trip_gives_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gen::new(72, 20, 8);
    let mut rng = StdRng::seed_from_u64(73);
    // Without a graph.
    let c = Corpus::random(71, 800, 20, 15);
    c.index.save(dir.path(), 3).unwrap();
    let (loaded, gen) = VectorIndex::load(dir.path()).unwrap();
    assert_eq!(gen, 3);
    assert_eq!(loaded.len(), c.index.len());
    assert_eq!(loaded.graph_status(), c.index.graph_status());
    let cases: Vec<(Vec<f32>, Filter)> = (0..60)
        .map(|_| (g.vector(), c.random_filter(&mut rng)))
        .collect();
    assert_eq!(all_results(&loaded, &cases), all_results(&c.index, &cases));

    // With a graph, tombstones and pending vectors; saving over the old file.
    let mut c = c;
    c.index.build_graph(&GraphParams::default()).unwrap();
    let keys: Vec<u64> = c.items.keys().copied().take(100).collect();
    for k in keys {
        c.index.remove(k);
    }
    for i in 0..30 {
        c.index.insert(900_000 + i, 7, &g.vector()).unwrap();
    }
    c.index.save(dir.path(), 4).unwrap();
    let (mut loaded, gen) = VectorIndex::load(dir.path()).unwrap();
    assert_eq!(gen, 4);
    assert_eq!(loaded.graph_status(), c.index.graph_status());
    assert_eq!(all_results(&loaded, &cases), all_results(&c.index, &cases));
    // The loaded index keeps working under mutation like the original.
    for idx in [&mut c.index, &mut loaded] {
        idx.extend_graph(2).unwrap();
        idx.remove(900_001);
    }
    assert_eq!(loaded.graph_status(), c.index.graph_status());
    assert_eq!(
        all_results(&loaded, &cases)
            .into_iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        all_results(&c.index, &cases)
            .into_iter()
            .map(|r| r.0)
            .collect::<Vec<_>>()
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![FILE_NAME.to_string()],
        "no temporary files left behind"
    );
}

fn file_contains(path: &Path, v: &[f32]) -> bool {
    let bytes = std::fs::read(path).unwrap();
    let needle: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    bytes.windows(needle.len()).any(|w| w == needle.as_slice())
}

#[test]
fn saved_files_no_longer_hold_removed_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Corpus::random(81, 500, 16, 8);
    c.index.build_graph(&GraphParams::default()).unwrap();
    let victims: Vec<u64> = c.items.keys().copied().take(25).collect();
    let stored: Vec<Vec<f32>> = victims
        .iter()
        .map(|k| c.index.vector(*k).unwrap().to_vec())
        .collect();
    c.index.save(dir.path(), 1).unwrap();
    let file = dir.path().join(FILE_NAME);
    for s in &stored {
        assert!(
            file_contains(&file, s),
            "precondition: the saved file holds the vector"
        );
    }
    for &k in &victims {
        c.index.remove(k);
    }
    c.index.save(dir.path(), 2).unwrap();
    for s in &stored {
        assert!(
            !file_contains(&file, s),
            "removed vector still in the saved file"
        );
    }
    // A stale temporary file from a crashed save is deleted by the next save.
    std::fs::write(dir.path().join("vectors.lann.tmp"), b"stale").unwrap();
    c.index.save(dir.path(), 3).unwrap();
    assert!(!dir.path().join("vectors.lann.tmp").exists());
}

#[test]
fn damaged_or_foreign_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Corpus::random(91, 200, 8, 5);
    c.index.build_graph(&GraphParams::default()).unwrap();
    c.index.save(dir.path(), 9).unwrap();
    let file = dir.path().join(FILE_NAME);
    let good = std::fs::read(&file).unwrap();
    let load_with = |bytes: &[u8]| {
        std::fs::write(&file, bytes).unwrap();
        VectorIndex::load(dir.path())
    };
    // Every single-byte flip anywhere in the file is detected.
    let mut rng = StdRng::seed_from_u64(92);
    for _ in 0..300 {
        let mut b = good.clone();
        let i = rng.random_range(0..b.len());
        b[i] ^= 1 << rng.random_range(0..8);
        match load_with(&b) {
            Err(Error::DataCorruption { .. }) | Err(Error::IncompatibleFormat { .. }) => {}
            other => panic!("flip at {i}: {other:?}"),
        }
    }
    // Truncations.
    for cut in [0usize, 1, 7, 30, 63, good.len() / 2, good.len() - 1] {
        match load_with(&good[..cut]) {
            Err(Error::DataCorruption { .. }) | Err(Error::IncompatibleFormat { .. }) => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    assert!(matches!(
        load_with(&good[..good.len() - 1]),
        Err(Error::DataCorruption { .. })
    ));
    // A body flip is a checksum failure, i.e. corruption.
    let mut b = good.clone();
    b[100] ^= 0x10;
    assert!(matches!(load_with(&b), Err(Error::DataCorruption { .. })));
    // A future version is incompatible, not corrupt.
    let mut b = good.clone();
    let len = b.len();
    b[8..12].copy_from_slice(&99u32.to_le_bytes());
    b[len - 16..len - 12].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(
        load_with(&b),
        Err(Error::IncompatibleFormat { .. })
    ));
    // Something else entirely.
    assert!(matches!(
        load_with(b"hello, world"),
        Err(Error::IncompatibleFormat { .. })
    ));
    assert!(matches!(
        load_with(&[0u8; 4096]),
        Err(Error::IncompatibleFormat { .. })
    ));
    // Internally inconsistent content with a valid checksum is still caught.
    let mut b = good.clone();
    let body = b.len() - 24;
    // Corrupt the first partition's first node id (after the 40-byte header,
    // 16-byte partition header and the keys), then re-seal the checksum.
    let count = u32::from_le_bytes(b[44..48].try_into().unwrap()) as usize;
    let node_at = 40 + 16 + 8 * count;
    b[node_at..node_at + 4].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
    let crc = crc32fast::hash(&b[..body]);
    b[body + 12..body + 16].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(load_with(&b), Err(Error::DataCorruption { .. })));
    // A missing file is an I/O error.
    std::fs::remove_file(&file).unwrap();
    assert!(matches!(
        VectorIndex::load(dir.path()),
        Err(Error::Io { .. })
    ));
    // The good file still loads.
    assert_eq!(load_with(&good).unwrap().1, 9);
}

#[test]
fn planner_takes_the_cheaper_route_by_its_cost_model() {
    let mut c = Corpus::random(101, 3000, 16, 40);
    let q = Gen::new(102, 16, 8).vector();
    assert_eq!(
        c.index.plan(10, &Filter::all()).route,
        Route::Exact,
        "no graph yet"
    );
    c.index.build_graph(&GraphParams::default()).unwrap();
    let all = c.index.plan(10, &Filter::all());
    let small = c.index.plan(10, &Filter::partitions(&c.partitions()[..1]));
    assert_eq!(small.route, Route::Exact);
    assert!(small.exact_cost_ns < all.exact_cost_ns);
    for plan in [all, small] {
        let cheaper = match plan.graph_cost_ns {
            Some(g) if g < plan.exact_cost_ns => Route::Graph,
            _ => Route::Exact,
        };
        assert_eq!(plan.route, cheaper);
    }
    let out = c
        .index
        .search_with(&q, 10, &Filter::all(), &SearchOptions::default())
        .unwrap();
    assert_eq!(out.route, all.route);
    // Make graph evaluations nearly free: now the planner must pick the graph
    // for the full set, and the search must take it.
    let mut cheap = c.index.planner();
    cheap.graph_ns_per_float = 1e-6;
    c.index.set_planner(cheap).unwrap();
    assert_eq!(c.index.plan(10, &Filter::all()).route, Route::Graph);
    let out = c
        .index
        .search_with(&q, 10, &Filter::all(), &SearchOptions::default())
        .unwrap();
    assert_eq!(out.route, Route::Graph);
    assert_eq!(out.hits.len(), 10);
    cheap.ef = 0;
    assert!(matches!(
        c.index.set_planner(cheap),
        Err(Error::InvalidParams(_))
    ));
}

/// The crate-level doc example, kept in sync by hand (doctests are off).
#[test]
fn crate_doc_example_holds() {
    let mut index = VectorIndex::new(3).unwrap();
    index.insert(1, 10, &[1.0, 0.0, 0.0]).unwrap();
    index.insert(2, 20, &[0.9, 0.1, 0.0]).unwrap();
    index.insert(3, 10, &[0.0, 1.0, 0.0]).unwrap();
    index.build_graph(&GraphParams::default()).unwrap();
    let hits = index
        .search(&[1.0, 0.0, 0.0], 2, &Filter::partitions(&[10]))
        .unwrap();
    assert_eq!(hits.iter().map(|h| h.key).collect::<Vec<_>>(), vec![1, 3]);
    assert!(index.remove(1));
    let hits = index.search(&[1.0, 0.0, 0.0], 2, &Filter::all()).unwrap();
    assert_eq!(hits[0].key, 2);
}
