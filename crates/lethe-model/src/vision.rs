//! Image classifiers for classifier unlearning (SalUn) and dataset
//! protection (error-minimising noise).
//!
//! * [`SmallCnn`]: conv3x3 → (batch norm) → 2x2 max-pool → ReLU blocks (the
//!   usual ReLU → pool, reordered: they commute) and a linear head;
//!   configurable channels, input size and classes. CPU-sized.
//! * [`ResNet18`]: the CIFAR variant (He et al. 2016; the layout of the
//!   SalUn and kuangliu/pytorch-cifar code): 3x3 stem without max-pool, four
//!   stages of two BasicBlocks, global average pool, linear head. PyTorch /
//!   torchvision parameter names. Meant for the GPU; a narrow `width` makes
//!   it CPU-testable.
//!
//! Convolution, batch norm and ReLU come from [`crate::nn`] ([`nn::conv2d`],
//! [`nn::batch_norm2d`], [`nn::relu`]: fused CPU kernels with hand-written
//! backward passes, primitive ops elsewhere) and max-pooling from
//! [`nn::max_pool2x2`] (candle's `max_pool2d` backward is wrong); running
//! statistics are stored in the model's VarMap (so
//! they are saved) but are not trainable. Both models keep their weights in
//! a [`VarMap`], train with [`crate::optim`], and can give gradients with
//! respect to the *input* images ([`input_gradient`]), which
//! error-minimising noise needs; [`ImageClassifier::freeze`] snapshots the
//! weights for many such gradients in evaluation mode, chained by hand
//! instead of by autograd ([`FrozenClassifier`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::nn::{self, Mode, Param};
use crate::{Error, Result};

mod frozen;

pub use frozen::FrozenClassifier;

/// File name of a classifier's weights inside its folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of a classifier's configuration inside its folder.
pub const CONFIG_FILE: &str = "config.json";

/// What SalUn and dataset protection need from a classifier.
pub trait ImageClassifier: std::fmt::Debug {
    /// Logits `(n, classes)` for images `(n, channels, height, width)`.
    fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor>;
    /// Trainable parameters with their names, sorted by name (batch-norm
    /// running statistics excluded).
    fn named_trainable_vars(&self) -> Vec<(String, Var)>;
    /// The VarMap holding every tensor, running statistics included.
    fn varmap(&self) -> &VarMap;
    /// The configuration.
    fn config(&self) -> &VisionConfig;
    /// Whether forward passes track gradients of the weights (turn off to
    /// get input gradients only).
    fn set_trainable(&self, trainable: bool);
    /// A copy of the current weights in evaluation mode, for repeated
    /// logits and input gradients without autograd ([`FrozenClassifier`]).
    fn freeze(&self) -> Result<FrozenClassifier>;

    /// Trainable Vars, sorted by name.
    fn trainable_vars(&self) -> Vec<Var> {
        self.named_trainable_vars()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// Writes `config.json` and `model.safetensors` into `dir`.
    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
        let json = serde_json::to_string_pretty(self.config())
            .map_err(|e| Error::Format(format!("serialising config: {e}")))?;
        let cfg = dir.join(CONFIG_FILE);
        std::fs::write(&cfg, json)
            .map_err(|e| Error::io(e, format!("writing {}", cfg.display())))?;
        let data = self
            .varmap()
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let tensors: HashMap<String, Tensor> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        Ok(())
    }
}

/// Architecture and sizes of a classifier, as stored in its `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case")]
pub enum VisionConfig {
    /// A [`SmallCnn`].
    Cnn(CnnConfig),
    /// A [`ResNet18`].
    Resnet18(ResNetConfig),
}

/// Sizes of a [`SmallCnn`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnnConfig {
    /// Input channels (3 for RGB).
    pub in_channels: usize,
    /// Input height and width (square images), divisible by `2^blocks`.
    pub image_size: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Output channels of each conv block (one block per entry, non-empty).
    pub channels: Vec<usize>,
    /// Batch norm after each convolution.
    pub batch_norm: bool,
}

/// Sizes of a [`ResNet18`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Channels of the first stage (64 in ResNet-18; stages use w, 2w, 4w, 8w).
    pub width: usize,
}

impl ResNetConfig {
    /// The standard CIFAR ResNet-18 (width 64) for `num_classes` RGB classes.
    pub fn cifar(num_classes: usize) -> ResNetConfig {
        ResNetConfig {
            in_channels: 3,
            num_classes,
            width: 64,
        }
    }
}

/// Loads a classifier folder written by [`ImageClassifier::save`],
/// whichever architecture it holds.
pub fn load_classifier(dir: &Path, device: &Device) -> Result<Box<dyn ImageClassifier>> {
    let (config, mut store) = read_folder(dir, device)?;
    let model: Box<dyn ImageClassifier> = match config {
        VisionConfig::Cnn(c) => {
            Box::new(SmallCnn::build(c, &mut store).map_err(|e| as_format(dir, e))?)
        }
        VisionConfig::Resnet18(c) => {
            Box::new(ResNet18::build(c, &mut store).map_err(|e| as_format(dir, e))?)
        }
    };
    store.finish()?;
    Ok(model)
}

/// A bad size in a stored config is a format problem of that folder.
fn as_format(dir: &Path, e: Error) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::Format(format!("{}: {m}", dir.display())),
        other => other,
    }
}

/// Mean cross-entropy of `model` on `images` with `labels` (`(n)` u32) and
/// its gradient with respect to the images (same shape as `images`).
///
/// Weight gradients are not computed while this runs (the model is made
/// non-trainable for the pass and restored after). In evaluation mode the
/// backward pass is chained by hand through [`ImageClassifier::freeze`]
/// (on the CPU the same gradient bit for bit) unless
/// `LETHE_FROZEN_GRAD=off`, which keeps candle's autograd (for
/// comparisons); callers that take many gradients through the same weights
/// should freeze once and call [`FrozenClassifier::input_gradient`].
pub fn input_gradient(
    model: &dyn ImageClassifier,
    images: &Tensor,
    labels: &Tensor,
    mode: Mode,
) -> Result<(f32, Tensor)> {
    if !mode.is_train() && frozen_gradients() {
        return model.freeze()?.input_gradient(images, labels);
    }
    autograd_input_gradient(model, images, labels, mode)
}

/// [`input_gradient`] by candle's autograd, in either mode.
pub(crate) fn autograd_input_gradient(
    model: &dyn ImageClassifier,
    images: &Tensor,
    labels: &Tensor,
    mode: Mode,
) -> Result<(f32, Tensor)> {
    let x = Var::from_tensor(&images.to_dtype(DType::F32)?)?;
    model.set_trainable(false);
    let result = (|| -> Result<(f32, Tensor)> {
        let logits = model.forward(x.as_tensor(), mode)?;
        let loss = nn::cross_entropy(&logits, labels, None)?;
        let value = loss.to_scalar::<f32>()?;
        let grads = loss.backward()?;
        let g = grads
            .get(x.as_tensor())
            .cloned()
            .unwrap_or(x.as_tensor().zeros_like()?);
        Ok((value, g))
    })();
    model.set_trainable(true);
    result
}

/// Whether evaluation-mode input gradients are chained by hand
/// ([`FrozenClassifier`]) rather than by candle's autograd: yes unless
/// `LETHE_FROZEN_GRAD=off` (read once), a switch for comparisons.
pub fn frozen_gradients() -> bool {
    nn::frozen::enabled()
}

/// Named tensors being turned into a model's Vars.
struct Store {
    tensors: HashMap<String, Tensor>,
    init: Option<StdRng>,
    device: Device,
    varmap: VarMap,
    trainable: Arc<AtomicBool>,
    named: Vec<(String, Var)>,
}

enum Init {
    /// Kaiming normal, fan-out, ReLU gain (torchvision's conv init).
    KaimingOut,
    /// Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Linear init).
    UniformFanIn(usize),
    Const(f32),
}

impl Store {
    fn random(seed: u64, device: &Device) -> Store {
        Store {
            tensors: HashMap::new(),
            init: Some(StdRng::seed_from_u64(seed)),
            device: device.clone(),
            varmap: VarMap::new(),
            trainable: Arc::new(AtomicBool::new(true)),
            named: Vec::new(),
        }
    }

    fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Store {
        Store {
            tensors,
            init: None,
            device: device.clone(),
            varmap: VarMap::new(),
            trainable: Arc::new(AtomicBool::new(true)),
            named: Vec::new(),
        }
    }

    fn var(&mut self, name: &str, shape: &[usize], init: Init, trainable: bool) -> Result<Var> {
        let t = match &mut self.init {
            Some(rng) => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::KaimingOut => {
                        let fan_out = shape[0] * shape[2..].iter().product::<usize>();
                        let std = (2.0 / fan_out as f64).sqrt() as f32;
                        crate::decoder::normal_vec(rng, n, std)
                    }
                    Init::UniformFanIn(fan_in) => {
                        let b = 1.0 / (fan_in as f64).sqrt();
                        (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
                    }
                    Init::Const(c) => vec![c; n],
                };
                Tensor::from_vec(data, shape, &self.device)?
            }
            None => {
                let t = self
                    .tensors
                    .remove(name)
                    .ok_or_else(|| Error::Format(format!("tensor {name} is missing")))?;
                if t.dims() != shape {
                    return Err(Error::Format(format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
        };
        self.finish_var(name, t, trainable)
    }

    fn finish_var(&mut self, name: &str, t: Tensor, trainable: bool) -> Result<Var> {
        let var = Var::from_tensor(&t)?;
        self.varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), var.clone());
        if trainable {
            self.named.push((name.to_string(), var.clone()));
        }
        Ok(var)
    }

    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        let var = self.var(name, shape, init, true)?;
        Ok(Param::new(var, self.trainable.clone()))
    }

    fn conv(
        &mut self,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Conv> {
        let weight = self.param(
            &format!("{name}.weight"),
            &[cout, cin, k, k],
            Init::KaimingOut,
        )?;
        let bias = if bias {
            Some(self.param(
                &format!("{name}.bias"),
                &[cout],
                Init::UniformFanIn(cin * k * k),
            )?)
        } else {
            None
        };
        Ok(Conv {
            weight,
            bias,
            stride,
            padding: k / 2,
        })
    }

    fn bn(&mut self, name: &str, c: usize) -> Result<BatchNorm> {
        Ok(BatchNorm {
            weight: self.param(&format!("{name}.weight"), &[c], Init::Const(1.0))?,
            bias: self.param(&format!("{name}.bias"), &[c], Init::Const(0.0))?,
            running_mean: self.var(
                &format!("{name}.running_mean"),
                &[c],
                Init::Const(0.0),
                false,
            )?,
            running_var: self.var(
                &format!("{name}.running_var"),
                &[c],
                Init::Const(1.0),
                false,
            )?,
        })
    }

    fn linear(&mut self, name: &str, cin: usize, cout: usize) -> Result<(Param, Param)> {
        Ok((
            self.param(
                &format!("{name}.weight"),
                &[cout, cin],
                Init::UniformFanIn(cin),
            )?,
            self.param(&format!("{name}.bias"), &[cout], Init::UniformFanIn(cin))?,
        ))
    }

    fn finish(&self) -> Result<()> {
        if !self.tensors.is_empty() {
            let mut extra: Vec<_> = self.tensors.keys().cloned().collect();
            extra.sort();
            return Err(Error::Format(format!(
                "unexpected tensors for this architecture: {}",
                extra.join(", ")
            )));
        }
        Ok(())
    }

    fn parts(&mut self) -> (VarMap, Arc<AtomicBool>, Vec<(String, Var)>) {
        let mut named = std::mem::take(&mut self.named);
        named.sort_by(|a, b| a.0.cmp(&b.0));
        (self.varmap.clone(), self.trainable.clone(), named)
    }
}

#[derive(Debug, Clone)]
struct Conv {
    weight: Param,
    bias: Option<Param>,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(Param::tensor);
        nn::conv2d(
            x,
            &self.weight.tensor(),
            bias.as_ref(),
            self.stride,
            self.padding,
        )
    }
}

#[derive(Debug, Clone)]
struct BatchNorm {
    weight: Param,
    bias: Param,
    running_mean: Var,
    running_var: Var,
}

/// PyTorch's default batch-norm momentum and epsilon.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

impl BatchNorm {
    /// `self(conv(x))`. Training: batch statistics, running statistics
    /// updated (PyTorch's momentum 0.1, unbiased variance). Evaluation: the
    /// running statistics, folded into the convolution off the CPU
    /// ([`nn::conv2d_batch_norm_eval`]). They are buffers, never trained:
    /// read detached, so that an input gradient does not also reduce the
    /// activations' gradient to every statistic (on a GPU those reductions
    /// over `(n, h, w)` cost more than the convolutions).
    fn after_conv(&self, conv: &Conv, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode.is_train() {
            return self.train_forward(&conv.forward(x)?);
        }
        let conv_bias = conv.bias.as_ref().map(Param::tensor);
        nn::conv2d_batch_norm_eval(
            x,
            (&conv.weight.tensor(), conv_bias.as_ref()),
            conv.stride,
            conv.padding,
            (&self.weight.tensor(), &self.bias.tensor()),
            (
                &self.running_mean.as_detached_tensor(),
                &self.running_var.as_detached_tensor(),
            ),
            BN_EPS,
        )
    }

    /// Training mode on a convolution's output `x`.
    fn train_forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (self.weight.tensor(), self.bias.tensor());
        let (mean, var) = nn::channel_stats(x)?;
        let (n, _, h, w_) = x.dims4()?;
        let count = (n * h * w_) as f64;
        let unbiased = if count > 1.0 {
            count / (count - 1.0)
        } else {
            1.0
        };
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - BN_MOMENTUM))?
            + (mean * BN_MOMENTUM)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - BN_MOMENTUM))?
            + ((var * unbiased)? * BN_MOMENTUM)?)?;
        let y = nn::batch_norm2d(x, &w, &b, None, BN_EPS)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(y)
    }
}

fn check_images(images: &Tensor, channels: usize, size: Option<usize>) -> Result<()> {
    let (n, c, h, w) = images.dims4().map_err(|_| {
        Error::InvalidArgument(format!(
            "images must be (n, c, h, w), got {:?}",
            images.dims()
        ))
    })?;
    if n == 0 || c != channels {
        return Err(Error::InvalidArgument(format!(
            "images are {:?}, expected a non-empty batch of {channels} channels",
            images.dims()
        )));
    }
    if let Some(s) = size {
        if h != s || w != s {
            return Err(Error::InvalidArgument(format!(
                "images are {h}x{w}, expected {s}x{s}"
            )));
        }
    }
    Ok(())
}

/// A small convolutional classifier (see the module docs).
pub struct SmallCnn {
    config: VisionConfig,
    cnn: CnnConfig,
    varmap: VarMap,
    trainable: Arc<AtomicBool>,
    named: Vec<(String, Var)>,
    blocks: Vec<(Conv, Option<BatchNorm>)>,
    head: (Param, Param),
}

impl SmallCnn {
    /// A randomly initialised CNN, deterministic for a given `seed`.
    pub fn new(config: CnnConfig, device: &Device, seed: u64) -> Result<SmallCnn> {
        let mut store = Store::random(seed, device);
        SmallCnn::build(config, &mut store)
    }

    /// Loads a folder written by [`ImageClassifier::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<SmallCnn> {
        let (config, mut store) = read_folder(dir, device)?;
        let VisionConfig::Cnn(config) = config else {
            return Err(Error::Format(format!(
                "{} does not hold a CNN",
                dir.display()
            )));
        };
        let model = SmallCnn::build(config, &mut store).map_err(|e| as_format(dir, e))?;
        store.finish()?;
        Ok(model)
    }

    fn build(config: CnnConfig, store: &mut Store) -> Result<SmallCnn> {
        let n = config.channels.len();
        if config.in_channels == 0
            || config.num_classes == 0
            || n == 0
            || config.channels.contains(&0)
        {
            return Err(Error::InvalidArgument(
                "CNN sizes (channels, classes, blocks) must be > 0".into(),
            ));
        }
        let div = 1usize.checked_shl(n as u32).unwrap_or(0);
        if div == 0 || config.image_size == 0 || config.image_size % div != 0 {
            return Err(Error::InvalidArgument(format!(
                "image size {} must be a positive multiple of 2^{n}",
                config.image_size
            )));
        }
        let mut blocks = Vec::with_capacity(n);
        let mut cin = config.in_channels;
        for (i, &cout) in config.channels.iter().enumerate() {
            let conv = store.conv(
                &format!("blocks.{i}.conv"),
                cin,
                cout,
                3,
                1,
                !config.batch_norm,
            )?;
            let bn = if config.batch_norm {
                Some(store.bn(&format!("blocks.{i}.bn"), cout)?)
            } else {
                None
            };
            blocks.push((conv, bn));
            cin = cout;
        }
        let side = config.image_size / div;
        let head = store.linear("head", cin * side * side, config.num_classes)?;
        let (varmap, trainable, named) = store.parts();
        Ok(SmallCnn {
            config: VisionConfig::Cnn(config.clone()),
            cnn: config,
            varmap,
            trainable,
            named,
            blocks,
            head,
        })
    }
}

impl std::fmt::Debug for SmallCnn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmallCnn")
            .field("config", &self.cnn)
            .finish_non_exhaustive()
    }
}

impl ImageClassifier for SmallCnn {
    fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        check_images(images, self.cnn.in_channels, Some(self.cnn.image_size))?;
        let mut x = images.clone();
        for (conv, bn) in &self.blocks {
            x = match bn {
                Some(bn) => bn.after_conv(conv, &x, mode)?,
                None => conv.forward(&x)?,
            };
            // Pooling first: max and ReLU commute (same values; the same
            // gradient but where the window's maximum is exactly 0), and
            // ReLU then runs on a quarter of the activations.
            x = nn::relu(&nn::max_pool2x2(&x)?)?;
        }
        let x = x.flatten_from(1)?;
        linear(&x, &self.head)
    }

    fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        self.named.clone()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn config(&self) -> &VisionConfig {
        &self.config
    }

    fn set_trainable(&self, trainable: bool) {
        self.trainable.store(trainable, Ordering::Relaxed);
    }

    fn freeze(&self) -> Result<FrozenClassifier> {
        FrozenClassifier::of_cnn(self)
    }
}

fn linear(x: &Tensor, (w, b): &(Param, Param)) -> Result<Tensor> {
    Ok(nn::linear_product(x, &w.tensor())?.broadcast_add(&b.tensor())?)
}

#[derive(Debug)]
struct BasicBlock {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    downsample: Option<(Conv, BatchNorm)>,
}

impl BasicBlock {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let y = nn::relu(&self.bn1.after_conv(&self.conv1, x, mode)?)?;
        let y = self.bn2.after_conv(&self.conv2, &y, mode)?;
        let shortcut = match &self.downsample {
            None => x.clone(),
            Some((conv, bn)) => bn.after_conv(conv, x, mode)?,
        };
        nn::relu(&(y + shortcut)?)
    }
}

/// ResNet-18, CIFAR variant (see the module docs).
pub struct ResNet18 {
    config: VisionConfig,
    res: ResNetConfig,
    varmap: VarMap,
    trainable: Arc<AtomicBool>,
    named: Vec<(String, Var)>,
    conv1: Conv,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: (Param, Param),
}

impl ResNet18 {
    /// A randomly initialised ResNet-18, deterministic for a given `seed`.
    pub fn new(config: ResNetConfig, device: &Device, seed: u64) -> Result<ResNet18> {
        let mut store = Store::random(seed, device);
        ResNet18::build(config, &mut store)
    }

    /// Loads a folder written by [`ImageClassifier::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<ResNet18> {
        let (config, mut store) = read_folder(dir, device)?;
        let VisionConfig::Resnet18(config) = config else {
            return Err(Error::Format(format!(
                "{} does not hold a ResNet-18",
                dir.display()
            )));
        };
        let model = ResNet18::build(config, &mut store).map_err(|e| as_format(dir, e))?;
        store.finish()?;
        Ok(model)
    }

    fn build(config: ResNetConfig, store: &mut Store) -> Result<ResNet18> {
        if config.in_channels == 0 || config.num_classes == 0 || config.width == 0 {
            return Err(Error::InvalidArgument("ResNet sizes must be > 0".into()));
        }
        let w = config.width;
        let conv1 = store.conv("conv1", config.in_channels, w, 3, 1, false)?;
        let bn1 = store.bn("bn1", w)?;
        let mut blocks = Vec::with_capacity(8);
        let mut cin = w;
        for stage in 0..4 {
            let cout = w << stage;
            for i in 0..2 {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let p = format!("layer{}.{i}", stage + 1);
                let conv1 = store.conv(&format!("{p}.conv1"), cin, cout, 3, stride, false)?;
                let bn1 = store.bn(&format!("{p}.bn1"), cout)?;
                let conv2 = store.conv(&format!("{p}.conv2"), cout, cout, 3, 1, false)?;
                let bn2 = store.bn(&format!("{p}.bn2"), cout)?;
                let downsample = if stride != 1 || cin != cout {
                    Some((
                        store.conv(&format!("{p}.downsample.0"), cin, cout, 1, stride, false)?,
                        store.bn(&format!("{p}.downsample.1"), cout)?,
                    ))
                } else {
                    None
                };
                blocks.push(BasicBlock {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    downsample,
                });
                cin = cout;
            }
        }
        let fc = store.linear("fc", cin, config.num_classes)?;
        let (varmap, trainable, named) = store.parts();
        Ok(ResNet18 {
            config: VisionConfig::Resnet18(config.clone()),
            res: config,
            varmap,
            trainable,
            named,
            conv1,
            bn1,
            blocks,
            fc,
        })
    }
}

impl std::fmt::Debug for ResNet18 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResNet18")
            .field("config", &self.res)
            .finish_non_exhaustive()
    }
}

impl ImageClassifier for ResNet18 {
    fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        check_images(images, self.res.in_channels, None)?;
        let mut x = nn::relu(&self.bn1.after_conv(&self.conv1, images, mode)?)?;
        for block in &self.blocks {
            x = block.forward(&x, mode)?;
        }
        let x = x.mean(D::Minus1)?.mean(D::Minus1)?;
        linear(&x, &self.fc)
    }

    fn named_trainable_vars(&self) -> Vec<(String, Var)> {
        self.named.clone()
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn config(&self) -> &VisionConfig {
        &self.config
    }

    fn set_trainable(&self, trainable: bool) {
        self.trainable.store(trainable, Ordering::Relaxed);
    }

    fn freeze(&self) -> Result<FrozenClassifier> {
        FrozenClassifier::of_resnet(self)
    }
}

fn read_folder(dir: &Path, device: &Device) -> Result<(VisionConfig, Store)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| Error::io(e, format!("reading {}", cfg_path.display())))?;
    let config: VisionConfig = serde_json::from_str(&text)
        .map_err(|e| Error::Format(format!("{}: {e}", cfg_path.display())))?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(Error::Format(format!("{} is missing", weights.display())));
    }
    let tensors = candle_core::safetensors::load(&weights, device)
        .map_err(|e| Error::Format(format!("{}: {e}", weights.display())))?;
    Ok((config, Store::from_tensors(tensors, device)))
}

#[cfg(test)]
mod tests;
