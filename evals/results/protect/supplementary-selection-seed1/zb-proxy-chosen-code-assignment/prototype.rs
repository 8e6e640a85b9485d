//! Scratch experiment (not committed): which assignment of the four lattice
//! textures to the four lesion classes do fresh victims learn least from?

use lethe_protect::dataset::Dataset;
use lethe_protect::victim::train_victim;
use lethe_protect::{formats, Arch, AuditConfig, Defence, RunControl};

fn perms(n: usize) -> Vec<Vec<u32>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in perms(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, (n - 1) as u32);
            out.push(q);
        }
    }
    out
}

fn remap(d: &Dataset, perm: &[u32]) -> Dataset {
    let mut classes = vec![String::new(); perm.len()];
    for (l, &j) in perm.iter().enumerate() {
        classes[j as usize] = d.classes()[l].clone();
    }
    Dataset::new(
        d.name(),
        d.shape(),
        d.pixels().to_vec(),
        d.labels().iter().map(|&l| perm[l as usize]).collect(),
        classes,
        d.items().to_vec(),
        d.format().clone(),
    )
    .unwrap()
}

fn main() {
    lethe_protect::tune_cpu_threads();
    let args: Vec<String> = std::env::args().collect();
    let cfg: AuditConfig =
        serde_json::from_str(&std::fs::read_to_string(&args[1]).unwrap()).unwrap();
    let mode = args.get(2).map(String::as_str).unwrap_or("search");
    let device = "cpu".parse::<lethe_model::DeviceSpec>().unwrap().open().unwrap();
    let data = formats::load(&cfg.source).unwrap();
    let (tr, te) = data.split(cfg.test_fraction, cfg.split_seed).unwrap();
    let train = data.subset(&tr).unwrap();
    let test = data.subset(&te).unwrap();
    let (ptr, pho) = train.split(0.2, 7).unwrap();
    let params = cfg.methods[0].params.clone();
    let cnn = Arch::Cnn {
        channels: vec![16, 32, 64],
        batch_norm: true,
    };
    if mode == "search" {
        for perm in perms(4) {
            let tp = remap(&train, &perm);
            let prot = lethe_protect::protect::protect_dataset(&tp, &params, &RunControl::default())
                .unwrap()
                .protected;
            let run = train_victim(
                &prot.subset(&ptr).unwrap(),
                &tp.subset(&pho).unwrap(),
                &cnn,
                0,
                &Defence::None,
                &cfg.victim,
                &device,
            )
            .unwrap();
            let later = run.curve.iter().skip(3).copied().fold(0.0, f64::max);
            println!(
                "perm {perm:?} proxy peak {:.1} epoch {} final {:.1} after3 {:.1}",
                100.0 * run.test_acc_peak,
                run.peak_epoch,
                100.0 * run.test_acc_final,
                100.0 * later
            );
        }
    } else {
        let perm: Vec<u32> = mode.split(',').map(|v| v.parse().unwrap()).collect();
        let tp = remap(&train, &perm);
        let prot = lethe_protect::protect::protect_dataset(&tp, &params, &RunControl::default())
            .unwrap()
            .protected;
        let testp = remap(&test, &perm);
        for arch in &cfg.victims {
            for seed in [0u64, 1] {
                let run = train_victim(&prot, &testp, arch, seed, &Defence::None, &cfg.victim, &device)
                    .unwrap();
                println!(
                    "perm {perm:?} {} seed {seed}: peak {:.1} (epoch {}) final {:.1}",
                    arch.label(),
                    100.0 * run.test_acc_peak,
                    run.peak_epoch,
                    100.0 * run.test_acc_final
                );
            }
        }
    }
}
