//! Prototype behind row zc of `../README.md` (not in the library): victims
//! on the lesions (selection draw) with model-free class-wise region codes,
//! and how fast a victim learns a code alone on black images.
//! Ran as `crates/lethe-protect/examples/scratch_dyn.rs` at commit 92f3d16:
//! `cargo build --release -p lethe-protect --example scratch_dyn`, then e.g.
//! `WHICH=code EPS= FAM=quadrant,band VSEED=1 ARCH='{"arch":"resnet18","width":8}' target/release/examples/scratch_dyn`
//! (`EPS=8,16` with `WHICH=all` runs the clean victim and u's lattice code).
use lethe_protect::{
    protect::protect_dataset, sources, victim::train_victim, Arch, Defence, LesionSpec,
    VictimConfig,
};
use lethe_protect::{ProtectParams, RunControl};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    lethe_model::device::keep_freed_cpu_memory();
    lethe_protect::tune_cpu_threads();
    let data = sources::lesions(&LesionSpec {
        seed: 1,
        ..LesionSpec::default()
    })?;
    let (tr, te) = data.split(0.25, 1)?;
    let train = data.subset(&tr)?;
    let test = data.subset(&te)?;
    let victim: VictimConfig = serde_json::from_str(
        r#"{"epochs":30,"batch":64,"sgd":{"lr":0.05,"momentum":0.9,"weight_decay":0.0005,"grad_clip":5.0}}"#,
    )?;
    let arch: Arch = serde_json::from_str(
        &std::env::var("ARCH")
            .unwrap_or(r#"{"arch":"cnn","channels":[16,32,64],"batch_norm":true}"#.into()),
    )?;
    let dev = candle_core::Device::Cpu;
    let run = |name: &str,
               tr: &lethe_protect::Dataset,
               te: &lethe_protect::Dataset|
     -> Result<(), Box<dyn std::error::Error>> {
        let vs: u64 = std::env::var("VSEED")
            .unwrap_or("0".into())
            .parse()
            .unwrap();
        let r = train_victim(tr, te, &arch, vs, &Defence::None, &victim, &dev)?;
        let c: Vec<String> = r
            .curve
            .iter()
            .map(|a| format!("{:.0}", a * 100.0))
            .collect();
        println!("{name:28} conf_final {:?}", r.confusion_final);
        println!(
            "{name:28} peak {:.1} final {:.1} train {:.1} | {}",
            r.test_acc_peak * 100.0,
            r.test_acc_final * 100.0,
            r.train_acc_final * 100.0,
            c.join(" ")
        );
        Ok(())
    };
    let which = std::env::var("WHICH").unwrap_or("all".into());
    if which == "all" || which.contains("clean") {
        run("clean", &train, &test)?;
    }
    for eps_k in std::env::var("EPS")
        .unwrap_or("8".into())
        .split(',')
        .filter(|e| !e.is_empty())
    {
        let eps: f64 = eps_k.parse::<f64>()? / 255.0;
        let p = ProtectParams::lattice_code(eps, 0.25);
        let prot = protect_dataset(&train, &p, &RunControl::default())?.protected;
        if which == "all" || which.contains("code") {
            run(&format!("lesions+code eps{eps_k}"), &prot, &test)?;
        }
        let blank = train.with_pixels(vec![0.0; train.pixels().len()])?;
        let bp = protect_dataset(&blank, &p, &RunControl::default())?.protected;
        if which == "all" || which.contains("blank") {
            run(&format!("code-only eps{eps_k}"), &bp, &bp)?;
        }
    }
    for fam in std::env::var("FAM")
        .unwrap_or_default()
        .split(',')
        .filter(|f| !f.is_empty())
    {
        let eps: f64 = std::env::var("E").unwrap_or("8".into()).parse::<f64>()? / 255.0;
        let apply = |d: &lethe_protect::Dataset| -> Result<lethe_protect::Dataset, Box<dyn std::error::Error>> {
            let sh = d.shape();
            let (h, w) = (sh.height, sh.width);
            let mut px = d.pixels().to_vec();
            for (i, &y) in d.labels().iter().enumerate() {
                let k = y as usize;
                for r in 0..h { for c in 0..w {
                    let on = match fam {
                        "quadneg" | "quadrant" => (r >= h/2) as usize * 2 + (c >= w/2) as usize == k,
                        "hstripe" => (r / 2) % 4 == k,
                        "vstripe" => (c / 2) % 4 == k,
                        "bandneg" | "band" => r / (h/4) == k,
                        "blocks4" => ((r/4) % 2) * 2 + (c/4) % 2 == k,
                        "blocks8" => ((r/8) % 2) * 2 + (c/8) % 2 == k,
                        "vband" => c / (w/4) == k,
                        "band2" => (r / (h/8)) % 4 == k,
                        "rings" => { let (dy, dx) = (r as f32 - (h as f32 - 1.0)/2.0, c as f32 - (w as f32 - 1.0)/2.0); let d2 = dy*dy + dx*dx; let a = (h*w) as f32 / std::f32::consts::PI; ((d2 / a * 4.0) as usize).min(3) == k && (dy.abs() <= h as f32 / 2.0) }
                        "rows1" => r % 4 == k,
                        "mixed" => match k { 0 => (r/2)%4==0, 1 => (c/2)%4==0, 2 => ((r+c)/2)%4==0, _ => ((r+w-c)/2)%4==0 },
                        _ => panic!("family"),
                    };
                    if on {
                        let j = i * h * w + r * w + c;
                        // "...neg": darken the organ (non-black pixels), brighten the background.
                        let sign = if fam.ends_with("neg") && px[j] > 0.0 { -1.0 } else { 1.0 };
                        px[j] = (px[j] + sign * eps as f32).clamp(0.0, 1.0);
                    }
                }}
            }
            Ok(d.with_pixels(px)?.quantize())
        };
        let prot = apply(&train)?;
        let blank = apply(&train.with_pixels(vec![0.0; train.pixels().len()])?)?;
        if which == "all" || which.contains("code") {
            run(&format!("{fam} lesions+code"), &prot, &test)?;
        }
        if which == "all" || which.contains("blank") {
            run(&format!("{fam} code-only"), &blank, &blank)?;
        }
    }
    Ok(())
}
