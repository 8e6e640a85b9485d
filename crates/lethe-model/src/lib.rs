//! The model runtime: every model lethe runs or trains goes through this crate.
//!
//! Two halves share one error type and one device choice:
//!
//! * **Inference with real pretrained models.** SmolLM2-135M-Instruct from its
//!   GGUF file (quantized Llama, tokenizer rebuilt from the GGUF metadata,
//!   ChatML template): generation, batched teacher-forced scoring and hidden
//!   states for kNN-LM keys. all-MiniLM-L6-v2 sentence embeddings for dense
//!   retrieval.
//! * **Training.** A Llama-layout decoder built only from ops with a backward
//!   pass (candle's fused norm, softmax, sdpa and rotary kernels silently cut
//!   gradients), LoRA adapters with per-adapter gates, optimizers that honour
//!   0/1 parameter masks exactly, and small image classifiers.
//!
//! Only this crate imports candle and chooses a [`candle_core::Device`].

// Inference with pretrained models.
pub mod chat;
pub mod embed;
pub mod generate;
pub mod gguf_llama;
pub mod tokenizer;

// Training.
pub mod decoder;
pub mod lora;
pub mod nn;
pub mod optim;
pub mod vision;

pub mod device;
mod error;

pub use device::DeviceSpec;
pub use error::{Error, Result};
