/**
 * trainer: pretrain, fine-tune and sample small Llama-style language models
 * with every op as a WGSL compute kernel on WebGPU.
 *
 * This module is the library's public surface: what another program imports
 * to train from its own loop, run a kernel, or read a checkpoint.
 *
 * @example Train the tiny preset for one step on a batch of token ids
 * ```ts
 * import { GpuModel, Gpu, presetConfig } from "./mod.ts";
 * const gpu = await Gpu.request();
 * const config = presetConfig("tiny");
 * const model = await GpuModel.create(gpu, config, { batchSize: 1, seqLen: 4 });
 * const batch = {
 *   ids: new Int32Array([1, 5, 6, 7]),
 *   targets: new Int32Array([5, 6, 7, 2]),
 *   mask: new Float32Array([1, 1, 1, 1]),
 * };
 * model.step([batch], {
 *   lr: 5e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, gradClip: 1,
 * }, 1);
 * console.log(await model.readLoss());
 * model.destroy();
 * gpu.destroy();
 * ```
 *
 * @module
 */

/** The GPU runtime: device acquisition, buffers, pipelines, dispatch. */
export {
  type AdapterSummary,
  type Binding,
  type Dispatch,
  type FatalHandler,
  Gpu,
  type GpuFeatures,
  type GpuRequestOptions,
  type TypedArray,
} from "./kernels/runtime.ts";
/** Model configuration, presets, validation and parameter counts. */
export {
  type ModelConfig,
  parameterCount,
  presetConfig,
  type PresetName,
  PRESETS,
  trainFlopsPerToken,
  validateConfig,
} from "./model/config.ts";
/** Parameter layout (Hugging Face names) and seeded initialization. */
export { initParameters, parameterSpecs, type ParamInit, type ParamSpec } from "./model/params.ts";
/** The CPU reference model (float64): the oracle every kernel is tested against. */
export {
  type Batch as ReferenceBatch,
  modelForward,
  modelLossAndGrads,
} from "./model/reference.ts";
/** The GPU model: forward, backward and AdamW of the whole network. */
export {
  type AdamWSettings,
  checkDeviceLimits,
  type GpuBatch,
  GpuModel,
  type GpuModelOptions,
} from "./model/gpu_model.ts";
/** Checkpoints that Hugging Face Transformers loads as they are. */
export {
  type CheckpointContents,
  loadCheckpoint,
  type LoadCheckpointOptions,
  type LoadedCheckpoint,
  saveCheckpoint,
  type SaveCheckpointOptions,
  type SaveStep,
} from "./model/checkpoint.ts";
/** Special token ids and `generation_config.json` contents, as checkpoints carry them. */
export {
  type ParsedGenerationConfig,
  type SamplingDefaults,
  type SpecialTokenIds,
} from "./model/hf_config.ts";
/** Safetensors files: untrusted-input-safe reader, writer. */
export {
  type Float32Tensor,
  openSafetensors,
  readSafetensors,
  type SafetensorsDtype,
  type SafetensorsFile,
  type TensorInfo,
  type TensorToWrite,
  type WriteDtype,
  writeSafetensors,
  type WriteSafetensorsOptions,
} from "./model/safetensors.ts";
/** Tokenizers and chat templates (Hugging Face files), streaming detokenization. */
export {
  type ChatMessage,
  type ChatTemplateOptions,
  type DecodeOptions,
  StreamingDecoder,
  TextTokenizer,
} from "./data/tokenizer.ts";
/** The training data stream: JSONL or token shards to shuffled, resumable batches. */
export {
  type Batch,
  type DataCounters,
  type DataPosition,
  type DataStats,
  DataStream,
  type DataStreamOptions,
  type ReaderPosition,
  type SampleOrigin,
} from "./data/stream.ts";
/** The two kinds of training data. */
export { type DataKind } from "./data/sources.ts";
/** The manifest of pre-tokenized shards (`trainer tokenize`). */
export { type ShardManifest } from "./data/shards.ts";
/** SFT rendering and the assistant-only loss mask. */
export { assistantMask, type ChatTokenizer } from "./data/sft.ts";
/** Pretrain packing. */
export { type DocumentTokenizer, documentTokens, packDocuments } from "./data/pretrain.ts";
/** Byte-level BPE training. */
export {
  type BpeOptions,
  type JsonlTrainOptions,
  type JsonlTrainResult,
  type TokenizerFileOptions,
  type TokenizerFiles,
  trainTokenizerOnJsonl,
  trainTokenizerOnTexts,
} from "./data/bpe.ts";
/** The embedded default corpus and tokenizer. */
export {
  defaultTokenizer,
  type EmbeddedCorpus,
  embeddedCorpus,
  type HeldOutFact,
  type SftRecord,
  writeEmbeddedCorpus,
} from "./data/corpus.ts";
/** The learning-rate schedule. */
export { cosineWithWarmup, type Schedule } from "./train/schedule.ts";
/** The PRNG every random choice uses. */
export { Rng, type RngState } from "./util/random.ts";
/** Errors that carry a user-facing message. */
export { UsageError, UserError } from "./util/errors.ts";
