//! Retrieval benchmark of `lethe-ann`: recall@10 and single-thread QPS at
//! 100 %, 10 %, 1 % and 0.1 % of vectors allowed, on the embedding-like data
//! of the project's performance anchors (shared/anchors.md §4).
//!
//! ```text
//! cargo run --release -p lethe-ann --example bench_retrieval -- \
//!     --out evals/results/retrieval.json [--n 100000] [--queries 200] [--compare-hnsw-rs]
//! ```
//!
//! Data: z ~ N(0, I_32), A = N(0,1)/sqrt(32) of shape 384x32, x = z A^T + 0.1 eps,
//! L2-normalised, seed 0 (Rust's StdRng, so the same distribution as the numpy
//! anchors, not the same numbers); queries drawn the same way.
//! Labels: 1000 partitions of varied sizes, assigned at random, so that the
//! allowed sets (0.1 % ⊂ 1 % ⊂ 10 %) are unions of whole labels.
//! Ground truth: exact f64 inner products over the allowed subset, computed
//! independently of the index. QPS: one query per `search` call on one thread.
//! The output JSON has a top-level `summary` {min_recall_at_10, min_qps}.

use std::collections::HashSet;
use std::time::Instant;

use lethe_ann::{Filter, GraphParams, Route, SearchOptions, Strategy, VectorIndex};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, LogNormal, Normal};
use rayon::prelude::*;
use serde_json::{json, Value};

const DIM: usize = 384;
const RANK: usize = 32;
const K: usize = 10;

struct Args {
    out: String,
    n: usize,
    queries: usize,
    compare_hnsw_rs: bool,
    min_secs: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        out: "evals/results/retrieval.json".into(),
        n: 100_000,
        queries: 200,
        compare_hnsw_rs: false,
        min_secs: 1.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--out" => a.out = val("--out")?,
            "--n" => a.n = val("--n")?.parse().map_err(|e| format!("--n: {e}"))?,
            "--queries" => {
                a.queries = val("--queries")?
                    .parse()
                    .map_err(|e| format!("--queries: {e}"))?
            }
            "--min-secs" => {
                a.min_secs = val("--min-secs")?
                    .parse()
                    .map_err(|e| format!("--min-secs: {e}"))?
            }
            "--compare-hnsw-rs" => a.compare_hnsw_rs = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Low-rank-plus-noise unit vectors, as in anchors.md §4.
fn embedding_like(rng: &mut StdRng, a: &[f32], n: usize) -> Vec<Vec<f32>> {
    let normal = Normal::new(0.0f32, 1.0).expect("valid normal");
    (0..n)
        .map(|_| {
            let z: Vec<f32> = (0..RANK).map(|_| normal.sample(rng)).collect();
            let mut x: Vec<f32> = (0..DIM)
                .map(|i| {
                    let row = &a[i * RANK..(i + 1) * RANK];
                    row.iter().zip(&z).map(|(p, q)| p * q).sum::<f32>() + 0.1 * normal.sample(rng)
                })
                .collect();
            let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            x.iter_mut().for_each(|v| *v /= norm);
            x
        })
        .collect()
}

/// Integer sizes proportional to log-normal weights, summing to `total`, each >= 1.
fn varied_sizes(rng: &mut StdRng, count: usize, total: usize, sigma: f64) -> Vec<usize> {
    let ln = LogNormal::new(0.0, sigma).expect("valid lognormal");
    let w: Vec<f64> = (0..count).map(|_| ln.sample(rng)).collect();
    let sum: f64 = w.iter().sum();
    let spare = total - count;
    let mut sizes: Vec<usize> = w
        .iter()
        .map(|x| 1 + (x / sum * spare as f64).floor() as usize)
        .collect();
    let mut have: usize = sizes.iter().sum();
    let mut i = 0;
    while have < total {
        sizes[i % count] += 1;
        have += 1;
        i += 1;
    }
    sizes
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    let mut s = [0.0f64; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    for (x, y) in ac.zip(bc) {
        for j in 0..4 {
            s[j] += x[j] as f64 * y[j] as f64;
        }
    }
    s.iter().sum()
}

/// Exact top-k keys over `allowed` ids, by f64 inner product, ties by id.
fn ground_truth(data: &[Vec<f32>], queries: &[Vec<f32>], allowed: &[usize]) -> Vec<Vec<u64>> {
    queries
        .par_iter()
        .map(|q| {
            let mut s: Vec<(f64, usize)> =
                allowed.iter().map(|&i| (dot64(q, &data[i]), i)).collect();
            let kk = K.min(s.len());
            if kk == 0 {
                return Vec::new();
            }
            s.select_nth_unstable_by(kk - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            s.truncate(kk);
            s.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            s.iter().map(|&(_, i)| i as u64).collect()
        })
        .collect()
}

struct Measured {
    qps: f64,
    recall: f64,
    routes: [usize; 3],
    mean_scored: f64,
}

fn measure(
    index: &VectorIndex,
    queries: &[Vec<f32>],
    truth: &[Vec<u64>],
    filter: &Filter,
    opts: &SearchOptions,
    min_secs: f64,
) -> Measured {
    let mut routes = [0usize; 3];
    let mut hit = 0usize;
    let mut want = 0usize;
    let mut scored = 0usize;
    for (q, t) in queries.iter().zip(truth) {
        let out = index.search_with(q, K, filter, opts).expect("search");
        routes[match out.route {
            Route::Exact => 0,
            Route::Graph => 1,
            Route::GraphThenExact => 2,
        }] += 1;
        scored += out.scored;
        let got: HashSet<u64> = out.hits.iter().map(|h| h.key).collect();
        hit += t.iter().filter(|k| got.contains(k)).count();
        want += t.len();
    }
    let start = Instant::now();
    let mut done = 0usize;
    while start.elapsed().as_secs_f64() < min_secs || done == 0 {
        for q in queries {
            let out = index.search_with(q, K, filter, opts).expect("search");
            std::hint::black_box(out);
        }
        done += queries.len();
    }
    let secs = start.elapsed().as_secs_f64();
    Measured {
        qps: done as f64 / secs,
        recall: if want == 0 {
            1.0
        } else {
            hit as f64 / want as f64
        },
        routes,
        mean_scored: scored as f64 / queries.len() as f64,
    }
}

fn route_json(r: [usize; 3]) -> Value {
    json!({"exact": r[0], "graph": r[1], "graph_then_exact": r[2]})
}

fn rss_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn peers() -> Value {
    json!({
        "source": "shared/anchors.md section 4 (same machine class, 2 cores, numpy data with the same recipe)",
        "unfiltered_single_thread": [
            {"lib": "hnswlib 0.8.0", "ef": 128, "qps": [1642, 1484], "recall_at_10": 0.953, "build_s_2_threads": [24.2, 25.3]},
            {"lib": "hnswlib 0.8.0", "ef": 256, "qps": [825, 766], "recall_at_10": 0.990},
            {"lib": "faiss HNSWFlat 1.15.1", "ef": 128, "qps": [1245, 1663], "recall_at_10": 0.971, "build_s_2_threads": [29.8, 28.3]},
            {"lib": "faiss HNSWFlat 1.15.1", "ef": 64, "qps": [2459, 3067], "recall_at_10": 0.891},
            {"lib": "faiss IndexFlatIP (exact)", "qps": [141, 142], "recall_at_10": 1.0},
            {"lib": "hnsw_rs 0.3.5 (stack.md)", "ef": 64, "qps": 750, "recall_at_10": 0.93, "build_s_2_threads": 80},
            {"lib": "hnsw_rs 0.3.5 (stack.md)", "ef": 128, "qps": 420, "recall_at_10": 0.98}
        ],
        "filtered_single_thread": {
            "faiss IndexFlatIP over the subset, one query per call": {"10%": [2880, 3548], "1%": [23664, 29222], "0.1%": [92474, 124077], "recall_at_10": 1.0},
            "faiss IndexFlatIP over the subset, 200-query batch": {"10%": [3294, 3710], "1%": [31939, 35676], "0.1%": [232350, 269948], "recall_at_10": 1.0},
            "faiss HNSW + IDSelector ef 64": {"10%": {"qps": [2198, 2722], "recall": 0.703}, "1%": {"qps": [2392, 2849], "recall": 0.420}, "0.1%": {"qps": [2060, 2746], "recall": 0.108}},
            "hnswlib filter callback ef 64": {"10%": {"qps": [331, 270], "recall": 0.995}, "1%": {"qps": [61, 61], "recall": 1.0}, "0.1%": {"qps": [16, 14], "recall": 1.0}},
            "hnsw_rs search_filter (stack.md)": {"10%": {"qps": "32-39"}, "1%": {"qps": 9}}
        }
    })
}

fn compare_hnsw_rs(
    data: &[Vec<f32>],
    queries: &[Vec<f32>],
    truth: &[Vec<u64>],
    min_secs: f64,
) -> Value {
    use hnsw_rs::prelude::{DistDot, Hnsw};
    let t = Instant::now();
    let hnsw: Hnsw<f32, DistDot> = Hnsw::new(16, data.len(), 16, 100, DistDot {});
    let items: Vec<(&Vec<f32>, usize)> = data.iter().enumerate().map(|(i, v)| (v, i)).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    pool.install(|| hnsw.parallel_insert(&items));
    let build = t.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for ef in [64usize, 96, 128] {
        let mut hit = 0;
        for (q, tr) in queries.iter().zip(truth) {
            let got: HashSet<u64> = hnsw
                .search(q, K, ef)
                .iter()
                .map(|n| n.d_id as u64)
                .collect();
            hit += tr.iter().filter(|k| got.contains(k)).count();
        }
        let start = Instant::now();
        let mut done = 0;
        while start.elapsed().as_secs_f64() < min_secs || done == 0 {
            for q in queries {
                std::hint::black_box(hnsw.search(q, K, ef));
            }
            done += queries.len();
        }
        let qps = done as f64 / start.elapsed().as_secs_f64();
        let recall = hit as f64 / (queries.len() * K) as f64;
        eprintln!("hnsw_rs ef {ef}: {qps:.0} QPS, recall@10 {recall:.4}");
        rows.push(json!({"ef": ef, "qps": qps.round(), "recall_at_10": recall}));
    }
    json!({"lib": "hnsw_rs 0.3.5 DistDot, M=16, ef_c=100, max_layer=16", "build_s_2_threads": build, "search": rows})
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let load_start = loadavg();
    let n = args.n;
    let mut rng = StdRng::seed_from_u64(0);
    let normal = Normal::new(0.0f32, 1.0)?;
    let scale = 1.0 / (RANK as f32).sqrt();
    let a: Vec<f32> = (0..DIM * RANK)
        .map(|_| normal.sample(&mut rng) * scale)
        .collect();
    let t = Instant::now();
    let data = embedding_like(&mut rng, &a, n);
    let queries = embedding_like(&mut rng, &a, args.queries);
    eprintln!("generated {n} x {DIM} in {:.1}s", t.elapsed().as_secs_f64());

    // Labels: nested allowed sets of exactly 0.1 %, 1 % and 10 %, plus the rest.
    let mut lrng = StdRng::seed_from_u64(1);
    let s01 = n / 1000;
    let s1 = n / 100;
    let s10 = n / 10;
    let mut sizes: Vec<(usize, u8)> = Vec::new(); // (size, tier) tier 0: in 0.1 %, 1: in 1 %, 2: in 10 %, 3: rest
    for s in varied_sizes(&mut lrng, 4, s01, 0.6) {
        sizes.push((s, 0));
    }
    for s in varied_sizes(&mut lrng, 6, s1 - s01, 0.8) {
        sizes.push((s, 1));
    }
    for s in varied_sizes(&mut lrng, 40, s10 - s1, 1.0) {
        sizes.push((s, 2));
    }
    for s in varied_sizes(&mut lrng, 950, n - s10, 1.2) {
        sizes.push((s, 3));
    }
    let mut label_ids: Vec<u32> = (0..sizes.len() as u32).map(|i| i * 7 + 3).collect();
    label_ids.shuffle(&mut lrng);
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut lrng);
    let mut label_of = vec![0u32; n];
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut at = 0;
    for (li, &(s, _)) in sizes.iter().enumerate() {
        let ids: Vec<usize> = perm[at..at + s].to_vec();
        for &i in &ids {
            label_of[i] = label_ids[li];
        }
        members.push(ids);
        at += s;
    }
    let tier_labels = |max_tier: u8| -> Vec<usize> {
        (0..sizes.len())
            .filter(|&li| sizes[li].1 <= max_tier)
            .collect()
    };
    let mut rest: Vec<usize> = tier_labels(3)
        .into_iter()
        .filter(|&li| sizes[li].1 == 3)
        .collect();
    rest.shuffle(&mut lrng);

    // Index.
    let t = Instant::now();
    let rss0 = rss_kib("VmRSS:");
    let mut index = VectorIndex::new(DIM)?;
    for (i, v) in data.iter().enumerate() {
        index.insert(i as u64, label_of[i], v)?;
    }
    let insert_s = t.elapsed().as_secs_f64();
    let params = GraphParams::default();
    let t = Instant::now();
    index.build_graph(&params)?;
    let build_s = t.elapsed().as_secs_f64();
    let rss1 = rss_kib("VmRSS:");
    eprintln!(
        "insert {insert_s:.2}s, graph build {build_s:.1}s (2 threads), index {} MiB",
        index.memory_bytes() >> 20
    );

    // Selectivities: the four targets, then extra points for the crossover.
    let mut sets: Vec<(String, Vec<usize>, bool)> = vec![
        ("100%".into(), (0..sizes.len()).collect(), true),
        ("10%".into(), tier_labels(2), true),
        ("1%".into(), tier_labels(1), true),
        ("0.1%".into(), tier_labels(0), true),
    ];
    for target in [0.7, 0.5, 0.3, 0.2, 0.15, 0.05, 0.02] {
        let mut labels = tier_labels(2);
        let mut have: usize = labels.iter().map(|&l| sizes[l].0).sum();
        let want = (target * n as f64) as usize;
        if want < have {
            labels = tier_labels(1);
            have = labels.iter().map(|&l| sizes[l].0).sum();
        }
        for &l in &rest {
            if have >= want {
                break;
            }
            labels.push(l);
            have += sizes[l].0;
        }
        sets.push((
            format!("{:.1}%", 100.0 * have as f64 / n as f64),
            labels,
            false,
        ));
    }

    let mut table = Vec::new();
    let mut crossover = Vec::new();
    let mut truths = Vec::new();
    let (mut min_recall, mut min_qps) = (f64::INFINITY, f64::INFINITY);
    for (name, labels, primary) in &sets {
        let allowed: Vec<usize> = labels
            .iter()
            .flat_map(|&l| members[l].iter().copied())
            .collect();
        let filter = if labels.len() == sizes.len() {
            Filter::all()
        } else {
            Filter::partitions(&labels.iter().map(|&l| label_ids[l]).collect::<Vec<_>>())
        };
        let t = Instant::now();
        let truth = ground_truth(&data, &queries, &allowed);
        let truth_s = t.elapsed().as_secs_f64();
        let plan = index.plan(K, &filter);
        let auto = measure(
            &index,
            &queries,
            &truth,
            &filter,
            &SearchOptions::default(),
            args.min_secs,
        );
        let exact = measure(
            &index,
            &queries,
            &truth,
            &filter,
            &SearchOptions {
                strategy: Strategy::Exact,
                ef: None,
            },
            args.min_secs * 0.5,
        );
        let graph = measure(
            &index,
            &queries,
            &truth,
            &filter,
            &SearchOptions {
                strategy: Strategy::Graph,
                ef: None,
            },
            args.min_secs * 0.5,
        );
        eprintln!(
            "{name:>6} allowed {:>6}: auto {:>8.0} QPS recall {:.4} routes {:?} | exact {:>8.0} QPS | graph {:>8.0} QPS recall {:.4} evals {:.0} (truth {truth_s:.1}s)",
            allowed.len(), auto.qps, auto.recall, auto.routes, exact.qps, graph.qps, graph.recall, graph.mean_scored
        );
        let row = json!({
            "selectivity": name,
            "allowed": allowed.len(),
            "labels": labels.len(),
            "recall_at_10": auto.recall,
            "qps": auto.qps.round(),
            "route": route_json(auto.routes),
            "plan": {"route": format!("{:?}", plan.route), "exact_cost_us": plan.exact_cost_ns / 1e3,
                     "graph_cost_us": plan.graph_cost_ns.map(|c| c / 1e3), "ef": plan.ef, "selectivity_in_graph": plan.selectivity},
            "forced_exact": {"qps": exact.qps.round(), "recall_at_10": exact.recall, "us_per_query": 1e6 / exact.qps},
            "forced_graph": {"qps": graph.qps.round(), "recall_at_10": graph.recall, "us_per_query": 1e6 / graph.qps,
                             "mean_distance_evals": graph.mean_scored, "route": route_json(graph.routes)},
        });
        if *primary {
            min_recall = min_recall.min(auto.recall);
            min_qps = min_qps.min(auto.qps);
            table.push(row);
            truths.push((name.clone(), filter, truth));
        } else {
            crossover.push(row);
        }
    }

    // ef sweep at 100 % (graph forced).
    let mut ef_sweep = Vec::new();
    let all_truth = &truths[0].2;
    for ef in [32usize, 64, 96, 128, 160, 192, 256] {
        let m = measure(
            &index,
            &queries,
            all_truth,
            &Filter::all(),
            &SearchOptions {
                strategy: Strategy::Graph,
                ef: Some(ef),
            },
            args.min_secs * 0.5,
        );
        eprintln!(
            "ef {ef:>4}: {:>6.0} QPS recall {:.4} evals {:.0}",
            m.qps, m.recall, m.mean_scored
        );
        ef_sweep.push(json!({"ef": ef, "qps": m.qps.round(), "recall_at_10": m.recall, "mean_distance_evals": m.mean_scored}));
    }

    // Cost-model fit from the forced measurements.
    let stride = DIM.div_ceil(16) * 16;
    let qstride = DIM.div_ceil(64) * 64;
    let planner = index.planner();
    let mut exact_fit = Vec::new();
    let mut graph_fit = Vec::new();
    for row in table.iter().chain(&crossover) {
        let allowed = row["allowed"].as_f64().unwrap_or(0.0);
        let labels = row["labels"].as_f64().unwrap_or(0.0);
        let ex_ns = row["forced_exact"]["us_per_query"].as_f64().unwrap_or(0.0) * 1e3;
        let quantized = allowed as usize >= planner.quantized_min_rows;
        let bytes = allowed
            * if quantized {
                qstride as f64
            } else {
                4.0 * stride as f64
            };
        let net = ex_ns - labels * planner.exact_ns_per_partition - planner.exact_ns_fixed;
        exact_fit.push(
            json!({"allowed": allowed, "quantized": quantized, "mib": bytes / (1u64 << 20) as f64,
            "ns_per_byte": net / bytes}),
        );
        let g_ns = row["forced_graph"]["us_per_query"].as_f64().unwrap_or(0.0) * 1e3;
        let evals = row["forced_graph"]["mean_distance_evals"]
            .as_f64()
            .unwrap_or(0.0);
        if row["forced_graph"]["route"]["graph"].as_u64().unwrap_or(0) > 0 && evals > 0.0 {
            graph_fit.push(json!({"allowed": allowed, "evals": evals, "ns_per_float": g_ns / (evals * stride as f64)}));
        }
    }
    eprintln!("fit: exact {}", Value::from(exact_fit.clone()));
    eprintln!("fit: graph {}", Value::from(graph_fit.clone()));

    // Erasure: remove 1 % of the vectors, time it, re-measure.
    let mut drng = StdRng::seed_from_u64(2);
    let mut victims: Vec<usize> = (0..n).collect();
    victims.shuffle(&mut drng);
    victims.truncate(n / 100);
    let t = Instant::now();
    let mut worst_remove = 0.0f64;
    for &v in &victims {
        let t1 = Instant::now();
        index.remove(v as u64);
        worst_remove = worst_remove.max(t1.elapsed().as_secs_f64());
    }
    let remove_s = t.elapsed().as_secs_f64();
    let gone: HashSet<usize> = victims.iter().copied().collect();
    let alive: Vec<usize> = (0..n).filter(|i| !gone.contains(i)).collect();
    let truth_after = ground_truth(&data, &queries, &alive);
    let after = measure(
        &index,
        &queries,
        &truth_after,
        &Filter::all(),
        &SearchOptions::default(),
        args.min_secs,
    );
    let status = index.graph_status();
    eprintln!(
        "removed {} in {remove_s:.2}s (worst {:.2} ms); after: {:.0} QPS recall {:.4}; status {status:?}",
        victims.len(), worst_remove * 1e3, after.qps, after.recall
    );
    let erasure = json!({
        "removed": victims.len(),
        "mean_remove_ms": remove_s * 1e3 / victims.len() as f64,
        "worst_remove_ms": worst_remove * 1e3,
        "after_100pct": {"qps": after.qps.round(), "recall_at_10": after.recall, "route": route_json(after.routes)},
        "tombstones": status.tombstones,
        "full_rebuild_s": build_s,
    });

    // Persistence: save, load, compare.
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    index.save(dir.path(), 7)?;
    let save_s = t.elapsed().as_secs_f64();
    let file_bytes = std::fs::metadata(dir.path().join(lethe_ann::FILE_NAME))?.len();
    let t = Instant::now();
    let (loaded, generation) = VectorIndex::load(dir.path())?;
    let load_s = t.elapsed().as_secs_f64();
    let mut identical = generation == 7;
    for (_, filter, _) in &truths {
        for q in queries.iter().take(50) {
            identical &= index.search(q, K, filter)? == loaded.search(q, K, filter)?;
        }
    }
    drop(loaded);
    eprintln!(
        "save {save_s:.2}s load {load_s:.2}s file {} MiB identical {identical}",
        file_bytes >> 20
    );

    let hnsw_rs = if args.compare_hnsw_rs {
        Some(compare_hnsw_rs(&data, &queries, all_truth, args.min_secs))
    } else {
        None
    };

    let report = json!({
        "benchmark": "lethe-ann bench_retrieval",
        "summary": {"min_recall_at_10": min_recall, "min_qps": min_qps.round()},
        "targets": {"recall_at_10": 0.95, "qps_floor": 500},
        "setup": {
            "vectors": n, "dim": DIM, "queries": queries.len(), "k": K,
            "data": "x = z A^T + 0.1 eps, z~N(0,I_32), A~N(0,1)/sqrt(32) 384x32, L2-normalised, StdRng seed 0",
            "labels": sizes.len(),
            "label_sizes": {"min": sizes.iter().map(|s| s.0).min(), "max": sizes.iter().map(|s| s.0).max()},
            "graph": {"m": params.m, "ef_construction": params.ef_construction, "threads": params.threads},
            "planner": format!("{:?}", index.planner()),
            "qps_method": "single thread, one query per search call, repeated passes over the queries for >= min_secs",
            "threads_available": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        },
        "build": {"insert_s": insert_s, "graph_build_s_2_threads": build_s},
        "memory": {"index_bytes": index.memory_bytes(), "rss_before_kib": rss0, "rss_after_build_kib": rss1,
                   "raw_vectors_bytes": n * DIM * 4},
        "results": table,
        "crossover": crossover,
        "ef_sweep_100pct": ef_sweep,
        "cost_fit": {"exact": exact_fit, "graph": graph_fit},
        "erasure": erasure,
        "persistence": {"save_s": save_s, "load_s": load_s, "file_bytes": file_bytes, "identical_results_after_load": identical},
        "hnsw_rs": hnsw_rs,
        "peers": peers(),
    });
    if let Some(parent) = std::path::Path::new(&args.out).parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "wrote {}; summary: min recall@10 {min_recall:.4}, min QPS {min_qps:.0}",
        args.out
    );
    Ok(())
}
