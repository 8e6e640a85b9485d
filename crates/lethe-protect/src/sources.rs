//! Built-in datasets: real data fetched with `lethe-assets` and the
//! generated sparse "lesion" set.
//!
//! * [`digits`]: scikit-learn's 8x8 handwritten digits (UCI optdigits test
//!   set, 1797 images, 10 classes), values `0..16` mapped onto the 8-bit
//!   grid they are released on.
//! * [`lfw_subset`]: scikit-image's 200 25x25 grayscale images, faces vs
//!   non-faces.
//! * [`dicom_patches`]: tiles of pydicom's CT and MR test slices,
//!   labelled by modality.
//! * [`medical_patches`]: colour tiles of scikit-image's histology and
//!   fundus sample photographs, labelled by modality.
//! * [`lesions`]: a deterministic synthetic set that mimics the sparsity of
//!   medical images (see `datasets/protect/README.md`): a black background
//!   (air), one textured "organ" covering about a third of the image, faint
//!   "vessels" in every image, and a class-defining lesion of a few pixels:
//!   none (`normal`), one round `nodule`, a `cluster` of 4-6 specks, or a
//!   thin `streak`. The class is carried by 1-3% of the pixels, the way a
//!   finding is in a scan.

use std::f32::consts::PI;
use std::io::Read;

use lethe_assets::{Asset, Cache};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Format, ImageShape, Item};
use crate::formats::dicom;
use crate::{Error, Result};

/// Parameters of the generated lesion dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LesionSpec {
    /// Generator seed (each image also depends on its class and index, so
    /// a larger `per_class` keeps the first images unchanged).
    pub seed: u64,
    /// Images per class (4 classes).
    pub per_class: usize,
    /// Image side in pixels (16..=128).
    pub size: usize,
    /// Standard deviation of the tissue texture inside the organ.
    pub texture: f32,
}

impl Default for LesionSpec {
    fn default() -> LesionSpec {
        LesionSpec {
            seed: 0,
            per_class: 300,
            size: 32,
            texture: 0.04,
        }
    }
}

/// Class names of the lesion dataset, in label order.
pub const LESION_CLASSES: [&str; 4] = ["normal", "nodule", "cluster", "streak"];

/// Generates the lesion dataset (8-bit grid, released as PNG).
pub fn lesions(spec: &LesionSpec) -> Result<Dataset> {
    check_lesion_spec(spec)?;
    let s = spec.size;
    let mut pixels = Vec::with_capacity(4 * spec.per_class * s * s);
    let mut labels = Vec::new();
    for i in 0..spec.per_class {
        for class in 0..4u32 {
            let mut rng = StdRng::seed_from_u64(mix(spec.seed, class as u64, i as u64));
            pixels.extend(lesion_image(&mut rng, class, spec));
            labels.push(class);
        }
    }
    let n = labels.len();
    Dataset::new(
        "lesions",
        ImageShape {
            channels: 1,
            height: s,
            width: s,
        },
        pixels,
        labels,
        LESION_CLASSES.iter().map(|c| c.to_string()).collect(),
        vec![Item::in_memory(Some(255)); n],
        Format::Generated,
    )
}

/// The lesion spec's limits (size 16..=128, 1..=100000 per class,
/// texture in [0, 0.2]).
fn check_lesion_spec(spec: &LesionSpec) -> Result<()> {
    if !(16..=128).contains(&spec.size) {
        return Err(Error::Config(format!(
            "lesion image size must be 16..=128, got {}",
            spec.size
        )));
    }
    if spec.per_class == 0 || spec.per_class > 100_000 {
        return Err(Error::Config(format!(
            "lesion per_class must be 1..=100000, got {}",
            spec.per_class
        )));
    }
    if !(0.0..=0.2).contains(&spec.texture) {
        return Err(Error::Config(format!(
            "lesion texture must be in [0, 0.2], got {}",
            spec.texture
        )));
    }
    Ok(())
}

/// SplitMix64 of three words: independent seeds per (seed, class, index).
pub(crate) fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a
        .wrapping_add(b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(c.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Soft inside-ness of distance `d` to an edge at 1.0 (1 inside, 0 out).
fn soft(d: f32, width: f32) -> f32 {
    (0.5 - (d - 1.0) / width).clamp(0.0, 1.0)
}

fn gauss(rng: &mut StdRng) -> f32 {
    // Box-Muller.
    let u1: f32 = rng.random_range(1e-7f32..1.0);
    let u2: f32 = rng.random_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// What the lesions of one class add to their images: the class signal a
/// victim can learn, against which a perturbation budget compares.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassSignal {
    /// Class name.
    pub class: String,
    /// Images measured.
    pub images: usize,
    /// Mean over the images of the squared L2 norm of what the lesion
    /// changes (on the released 8-bit grid, values in 0..1).
    pub energy_mean: f64,
    /// The smallest such norm.
    pub energy_min: f64,
    /// Mean number of pixels the lesion changes by more than half a level.
    pub pixels_mean: f64,
}

/// [`ClassSignal`] per class over every image [`lesions`] generates for
/// `spec`: each image is compared with itself before its lesion was drawn
/// (the same random draws up to that point).
pub fn lesion_class_signal(spec: &LesionSpec) -> Result<Vec<ClassSignal>> {
    check_lesion_spec(spec)?;
    Ok((0..4u32)
        .map(|class| {
            let (mut sum, mut min, mut pixels) = (0f64, f64::INFINITY, 0usize);
            for i in 0..spec.per_class {
                let mut rng = StdRng::seed_from_u64(mix(spec.seed, class as u64, i as u64));
                let (image, before) = lesion_layers(&mut rng, class, spec);
                let e: f64 = image
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| f64::from(a - b).powi(2))
                    .sum();
                sum += e;
                min = min.min(e);
                pixels += image
                    .iter()
                    .zip(&before)
                    .filter(|(a, b)| (*a - *b).abs() > 0.5 / 255.0)
                    .count();
            }
            let n = spec.per_class as f64;
            ClassSignal {
                class: LESION_CLASSES[class as usize].to_string(),
                images: spec.per_class,
                energy_mean: sum / n,
                energy_min: min,
                pixels_mean: pixels as f64 / n,
            }
        })
        .collect())
}

fn lesion_image(rng: &mut StdRng, class: u32, spec: &LesionSpec) -> Vec<f32> {
    lesion_layers(rng, class, spec).0
}

/// The 8-bit grid of `v` in 0..1.
fn quantise(v: f32) -> f32 {
    (v.clamp(0.0, 1.0) * 255.0).round() / 255.0
}

/// A lesion image and the same image before its lesion, both on the 8-bit
/// grid.
fn lesion_layers(rng: &mut StdRng, class: u32, spec: &LesionSpec) -> (Vec<f32>, Vec<f32>) {
    let s = spec.size;
    let sf = s as f32;
    let c = (sf - 1.0) / 2.0;
    // Organ: a rotated ellipse.
    let (cx, cy) = (
        c + rng.random_range(-0.06..0.06) * sf,
        c + rng.random_range(-0.06..0.06) * sf,
    );
    let (ra, rb) = (
        rng.random_range(0.30..0.40) * sf,
        rng.random_range(0.24..0.32) * sf,
    );
    let th: f32 = rng.random_range(0.0..PI);
    let (ct, st) = (th.cos(), th.sin());
    let base: f32 = rng.random_range(0.22..0.34);
    let organ_d = |x: f32, y: f32| {
        let (dx, dy) = (x - cx, y - cy);
        let u = (dx * ct + dy * st) / ra;
        let v = (-dx * st + dy * ct) / rb;
        (u * u + v * v).sqrt()
    };
    let mut img = vec![0f32; s * s];
    let mut inside = vec![0f32; s * s];
    // Smooth texture: noise averaged over a 3x3 window.
    let raw: Vec<f32> = (0..s * s).map(|_| gauss(rng)).collect();
    for y in 0..s {
        for x in 0..s {
            let m = soft(organ_d(x as f32, y as f32), 0.08);
            inside[y * s + x] = m;
            let mut acc = 0.0;
            let mut k = 0.0;
            for dy in -1i32..=1 {
                for dx in -1i32..=1 {
                    let (xx, yy) = (x as i32 + dx, y as i32 + dy);
                    if xx >= 0 && yy >= 0 && (xx as usize) < s && (yy as usize) < s {
                        acc += raw[yy as usize * s + xx as usize];
                        k += 1.0;
                    }
                }
            }
            img[y * s + x] = m * (base + spec.texture * 3.0 * acc / k);
        }
    }
    // Vessels (every class): 1-2 faint lines crossing the organ.
    for _ in 0..rng.random_range(1..=2) {
        let a: f32 = rng.random_range(0.0..PI);
        let off = rng.random_range(-0.2..0.2) * sf;
        let amp = rng.random_range(0.04..0.08);
        let (na, nb) = (a.sin(), -a.cos());
        for y in 0..s {
            for x in 0..s {
                let d = ((x as f32 - cx) * na + (y as f32 - cy) * nb - off).abs();
                img[y * s + x] += inside[y * s + x] * amp * soft(d / 0.7, 0.6);
            }
        }
    }
    // A point well inside the organ.
    let place = |rng: &mut StdRng| loop {
        let (x, y) = (
            cx + rng.random_range(-0.55..0.55) * ra,
            cy + rng.random_range(-0.55..0.55) * ra,
        );
        if organ_d(x, y) < 0.6 {
            return (x, y);
        }
    };
    let blob = |img: &mut [f32], bx: f32, by: f32, r: f32, amp: f32| {
        for y in 0..s {
            for x in 0..s {
                let d = ((x as f32 - bx).powi(2) + (y as f32 - by).powi(2)).sqrt() / r;
                img[y * s + x] += amp * soft(d, 0.5 / r.max(0.5));
            }
        }
    };
    let scale = sf / 32.0;
    let before: Vec<f32> = img.iter().copied().map(quantise).collect();
    match class {
        1 => {
            let (x, y) = place(rng);
            let r = rng.random_range(2.0..3.0) * scale;
            let amp = rng.random_range(0.35..0.50);
            blob(&mut img, x, y, r, amp);
        }
        2 => {
            let (x0, y0) = place(rng);
            for _ in 0..rng.random_range(4..=6) {
                let (x, y) = (
                    x0 + rng.random_range(-4.0..4.0) * scale,
                    y0 + rng.random_range(-4.0..4.0) * scale,
                );
                let amp = rng.random_range(0.35..0.50);
                blob(&mut img, x, y, 0.8 * scale, amp);
            }
        }
        3 => {
            let (x0, y0) = place(rng);
            let a: f32 = rng.random_range(0.0..PI);
            let len = rng.random_range(4.5..6.0) * scale;
            let amp = rng.random_range(0.35..0.50);
            let (ux, uy) = (a.cos(), a.sin());
            for y in 0..s {
                for x in 0..s {
                    let (dx, dy) = (x as f32 - x0, y as f32 - y0);
                    let along = (dx * ux + dy * uy) / len;
                    let across = (-dx * uy + dy * ux) / (0.7 * scale);
                    let d = (along * along + across * across).sqrt();
                    img[y * s + x] += amp * soft(d, 0.3);
                }
            }
        }
        _ => {}
    }
    (img.into_iter().map(quantise).collect(), before)
}

/// scikit-learn's digits on the 8-bit grid (values `v / 16` rounded to
/// multiples of 1/255).
pub fn digits() -> Result<Dataset> {
    let dir = Cache::from_env().ensure(Asset::SKLEARN_DATA)?;
    let path = dir.join("digits.csv.gz");
    let file = std::fs::File::open(&path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| Error::decode(&path, format!("gzip: {e}")))?;
    parse_digits(&text, &path)
}

/// Parses the digits CSV (64 values `0..=16` and a label per row).
pub(crate) fn parse_digits(text: &str, path: &std::path::Path) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (row, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::decode(path, format!("row {}: {e}", row + 1)))?;
        if vals.len() != 65 || vals[..64].iter().any(|v| !(0.0..=16.0).contains(v)) {
            return Err(Error::decode(
                path,
                format!("row {}: expected 64 values in 0..=16 and a label", row + 1),
            ));
        }
        pixels.extend(
            vals[..64]
                .iter()
                .map(|v| (v / 16.0 * 255.0).round() / 255.0),
        );
        let label = vals[64];
        if !(0.0..=9.0).contains(&label) || label.fract() != 0.0 {
            return Err(Error::decode(path, format!("row {}: bad label", row + 1)));
        }
        labels.push(label as u32);
    }
    let n = labels.len();
    Dataset::new(
        "digits",
        ImageShape {
            channels: 1,
            height: 8,
            width: 8,
        },
        pixels,
        labels,
        (0..10).map(|d| d.to_string()).collect(),
        vec![Item::in_memory(Some(255)); n],
        Format::Generated,
    )
}

/// scikit-image's LFW subset (faces vs non-faces) on the 8-bit grid.
pub fn lfw_subset() -> Result<Dataset> {
    let dir = Cache::from_env().ensure(Asset::SKIMAGE_DATA)?;
    let path = dir.join("lfw_subset.npy");
    let bytes = crate::formats::read_file(&path)?;
    let array = crate::formats::npy::parse(&bytes, &path)?;
    if array.shape.len() != 3 || array.shape[0] != 200 {
        return Err(Error::decode(
            &path,
            format!("expected (200, H, W), got {:?}", array.shape),
        ));
    }
    let (h, w) = (array.shape[1], array.shape[2]);
    let raw = array.to_f64()?;
    let pixels = raw
        .iter()
        .map(|&v| ((v.clamp(0.0, 1.0) * 255.0).round() / 255.0) as f32)
        .collect();
    let labels = (0..200).map(|i| u32::from(i >= 100)).collect();
    Dataset::new(
        "lfw-subset",
        ImageShape {
            channels: 1,
            height: h,
            width: w,
        },
        pixels,
        labels,
        vec!["face".into(), "non-face".into()],
        vec![Item::in_memory(Some(255)); 200],
        Format::Generated,
    )
}

/// `patch`x`patch` tiles of pydicom's `CT_small.dcm` (stride `patch / 2`)
/// and `MR_small.dcm` (stride `patch / 4`), each slice min-max normalised,
/// nearly uniform tiles (std < 0.02) dropped; released as 16-bit PNG.
pub fn dicom_patches(patch: usize) -> Result<Dataset> {
    check_patch_side("DICOM", patch)?;
    let dir = Cache::from_env().ensure(Asset::PYDICOM_DATA)?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (label, (file, stride)) in [("CT_small.dcm", patch / 2), ("MR_small.dcm", patch / 4)]
        .into_iter()
        .enumerate()
    {
        let (shape, frames) = dicom::stored_values(&dir.join(file))?;
        for stored in frames {
            let lo = stored.iter().min().copied().unwrap_or(0) as f32;
            let hi = stored.iter().max().copied().unwrap_or(0) as f32;
            let span = (hi - lo).max(1.0);
            let plane: Vec<f32> = stored
                .iter()
                .map(|&v| ((v as f32 - lo) / span * 65535.0).round() / 65535.0)
                .collect();
            for tile in textured_tiles(&plane, 1, shape.height, shape.width, patch, stride) {
                pixels.extend(tile);
                labels.push(label as u32);
            }
        }
    }
    let n = labels.len();
    Dataset::new(
        "dicom-patches",
        ImageShape {
            channels: 1,
            height: patch,
            width: patch,
        },
        pixels,
        labels,
        vec!["ct".into(), "mr".into()],
        vec![Item::in_memory(Some(65535)); n],
        Format::Generated,
    )
}

/// Tiles of scikit-image's two colour medical sample images, labelled by
/// modality: `histology` (an immunohistochemistry stain, `ihc.png`,
/// 512x512) and `fundus` (a retina photograph, `retina.jpg`, 1411x1411,
/// box-averaged 4x4 to a comparable scale, 352x352).
///
/// Tiles are `patch`x`patch` at a stride of half a tile. Near-uniform tiles
/// (the fundus photograph's black surround) are dropped, then the larger
/// class is thinned evenly to the smaller one's count. The only colour set
/// among the built-ins, so the one on which the grayscale countermeasure
/// applies; the fundus tiles on the field's rim are half black, the
/// sparsity of the lesions set in a real photograph.
pub fn medical_patches(patch: usize) -> Result<Dataset> {
    check_patch_side("medical", patch)?;
    let dir = Cache::from_env().ensure(Asset::SKIMAGE_DATA)?;
    let mut classes = Vec::new();
    for (file, factor) in [("ihc.png", 1), ("retina.jpg", 4)] {
        let (h, w, planes) = rgb_planes(&dir.join(file), factor)?;
        classes.push(textured_tiles(&planes, 3, h, w, patch, patch / 2));
    }
    let n = classes.iter().map(Vec::len).min().unwrap_or(0);
    let mut pixels = Vec::with_capacity(2 * n * 3 * patch * patch);
    let mut labels = Vec::with_capacity(2 * n);
    for (label, tiles) in classes.iter().enumerate() {
        // Evenly spaced over the image, in scan order.
        for i in 0..n {
            pixels.extend_from_slice(&tiles[i * tiles.len() / n]);
            labels.push(label as u32);
        }
    }
    Dataset::new(
        "medical-patches",
        ImageShape {
            channels: 3,
            height: patch,
            width: patch,
        },
        pixels,
        labels,
        vec!["histology".into(), "fundus".into()],
        vec![Item::in_memory(Some(255)); 2 * n],
        Format::Generated,
    )
}

/// An RGB image file as planar `(3, h, w)` values on the 8-bit grid,
/// box-averaged `factor`x`factor` (the remainder rows and columns dropped).
fn rgb_planes(path: &std::path::Path, factor: usize) -> Result<(usize, usize, Vec<f32>)> {
    let bytes = crate::formats::read_file(path)?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| Error::decode(path, format!("image decode failed: {e}")))?
        .to_rgb8();
    let full_w = img.width() as usize;
    let (h, w) = (img.height() as usize / factor, full_w / factor);
    let raw = img.as_raw();
    let mut out = vec![0f32; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut acc = 0u32;
                for dy in 0..factor {
                    for dx in 0..factor {
                        acc +=
                            u32::from(raw[((y * factor + dy) * full_w + x * factor + dx) * 3 + c]);
                    }
                }
                let mean = acc as f32 / (factor * factor) as f32;
                out[(c * h + y) * w + x] = mean.round() / 255.0;
            }
        }
    }
    Ok((h, w, out))
}

/// A tile side of the tiled built-ins (`what` names the set in the error).
fn check_patch_side(what: &str, patch: usize) -> Result<()> {
    if (8..=32).contains(&patch) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} patch side must be 8..=32, got {patch}"
        )))
    }
}

/// `patch`x`patch` tiles of a planar `(channels, h, w)` image at `stride`
/// (at least 1), in scan order, each planar `(channels, patch, patch)`,
/// without the near-uniform ones (standard deviation over the tile's
/// values below 0.02: a uniform background teaches nothing).
fn textured_tiles(
    planes: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    patch: usize,
    stride: usize,
) -> Vec<Vec<f32>> {
    let stride = stride.max(1);
    let mut tiles = Vec::new();
    let mut y = 0;
    while y + patch <= h {
        let mut x = 0;
        while x + patch <= w {
            let mut tile = Vec::with_capacity(channels * patch * patch);
            for c in 0..channels {
                for r in 0..patch {
                    let row = (c * h + y + r) * w + x;
                    tile.extend_from_slice(&planes[row..row + patch]);
                }
            }
            let mean = tile.iter().sum::<f32>() / tile.len() as f32;
            let var = tile.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / tile.len() as f32;
            if var.sqrt() >= 0.02 {
                tiles.push(tile);
            }
            x += stride;
        }
        y += stride;
    }
    tiles
}

#[cfg(test)]
mod tests;
