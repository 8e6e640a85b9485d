//! Shared fixtures for the inference tests: the real models, loaded once per
//! test binary (the folder comes from `lethe_assets`, as in production).

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::Device;

use crate::embed::Embedder;
use crate::generate::Llm;
use crate::gguf_llama::{LoadOptions, WeightFormat};
use crate::tokenizer::Tokenizer;

/// Path of the SmolLM2-135M-Instruct GGUF file.
pub(crate) fn smollm_path() -> PathBuf {
    lethe_assets::Cache::from_env()
        .ensure(lethe_assets::Asset::SMOLLM2_135M_INSTRUCT)
        .expect("SmolLM2 asset")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Folder of all-MiniLM-L6-v2.
pub(crate) fn minilm_dir() -> PathBuf {
    lethe_assets::Cache::from_env()
        .ensure(lethe_assets::Asset::ALL_MINILM_L6_V2)
        .expect("MiniLM asset")
}

/// SmolLM2 in the default format (Q8_0), loaded once.
pub(crate) fn llm() -> &'static Llm {
    static LLM: OnceLock<Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        Llm::load(
            &smollm_path(),
            &Device::Cpu,
            &LoadOptions {
                format: WeightFormat::Q8_0,
                max_context: None,
            },
        )
        .expect("load SmolLM2")
    })
}

/// The SmolLM2 tokenizer.
pub(crate) fn tokenizer() -> &'static Tokenizer {
    &llm().tokenizer
}

/// The MiniLM embedder, loaded once.
pub(crate) fn embedder() -> &'static Embedder {
    static E: OnceLock<Embedder> = OnceLock::new();
    E.get_or_init(|| Embedder::load(&minilm_dir(), &Device::Cpu).expect("load MiniLM"))
}

/// `LETHE_TEST_SIZE=full` asks for the bigger variants of heavy tests.
pub(crate) fn full_size() -> bool {
    std::env::var("LETHE_TEST_SIZE").is_ok_and(|v| v == "full")
}
