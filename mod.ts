/**
 * trainer: pretrain, fine-tune and sample small Llama-style language models
 * with every op as a WGSL compute kernel on WebGPU.
 *
 * This module is the library's public surface: what another program imports
 * to train from its own loop, run a kernel, or read a checkpoint.
 *
 * @example Train the tiny preset for one step on a batch of token ids
 * ```ts
 * import { AdamW, emptyBatch, Gpu, presetConfig, setRow, TrainingModel } from "./mod.ts";
 * const gpu = await Gpu.request();
 * const config = presetConfig("tiny");
 * const model = await TrainingModel.create(gpu, config, { batchSize: 1, seqLen: 4 });
 * const adamw = await AdamW.create(gpu, model.trainable(), {
 *   beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0.01, gradClip: 1,
 * });
 * const batch = emptyBatch(1, 4, 0);
 * setRow(batch, 0, { ids: [1, 5, 6, 7, 2] }, 0);
 * model.forwardBackward([batch]);
 * adamw.step(5e-4);
 * console.log(await model.readLoss());
 * adamw.destroy();
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
  type Owned,
  type TextureCopy,
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
/** Parameter layout (Hugging Face names, by role) and seeded initialization. */
export {
  initParameters,
  type LayerTensors,
  mapTensors,
  type ModelTensors,
  parameterSpecs,
  type ParamInit,
  type ParamSpec,
  tensorNames,
} from "./model/params.ts";
/** The CPU reference model (float64): the oracle every kernel is tested against. */
export { modelForward, modelLossAndGrads } from "./model/reference.ts";
/** The GPU model for training: forward, loss and backward of the whole network. */
export {
  type TrainableParameters,
  TrainingModel,
  type TrainingModelOptions,
} from "./model/train_model.ts";
/** Low-rank adapters (LoRA): settings, layout with PEFT names, init, merge. */
export {
  type FusedProjection,
  initLora,
  LORA_DEFAULTS,
  LORA_TARGETS,
  type LoraConfig,
  type LoraLayout,
  loraLayout,
  loraParameterCount,
  loraScale,
  type LoraSite,
  type LoraTarget,
  mergeLora,
  PEFT_MODULES,
} from "./model/lora.ts";
/** PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`). */
export {
  type AdapterContents,
  loadAdapter,
  type LoadAdapterOptions,
  type LoadedAdapter,
  saveAdapter,
} from "./io/peft.ts";
/** The flat parameter layout (fused q|k|v and gate|up, decayed tensors first). */
export {
  type FloatRange,
  type LayerSlots,
  LAYOUT_ALIGN,
  type ParamLayout,
  paramLayout,
  type TensorSlot,
} from "./model/layout.ts";
/** What a model and batch need of the device, checked before allocating. */
export {
  checkDeviceLimits,
  LOGITS_CHUNK_BYTES,
  LOGITS_CHUNK_BYTES_CPU,
  logitsChunkBudget,
  logitsChunkRows,
} from "./model/plan.ts";
/** The GPU model for generation, with its KV cache, and the generation loop. */
export { InferenceModel, type InferenceModelOptions } from "./model/inference.ts";
export { generate, type GenerateOptions, type GenerateResult } from "./model/generate.ts";
/** Sampling: settings, defaults, and one token from logits. */
export { DEFAULT_SAMPLING, GREEDY, sampleToken, type SamplingOptions } from "./model/sampling.ts";
/** AdamW with global-norm clipping on the GPU. */
export {
  AdamW,
  type AdamWHyperparameters,
  type AdamWState,
  type OptimizedParameters,
} from "./optim/adamw.ts";
/** Checkpoints that Hugging Face Transformers loads as they are. */
export {
  type CheckpointContents,
  loadCheckpoint,
  type LoadCheckpointOptions,
  type LoadedCheckpoint,
  saveCheckpoint,
  type SaveCheckpointOptions,
  type SaveStep,
} from "./io/checkpoint.ts";
/**
 * Any model a command loads: a checkpoint directory, or a PyTorch `.pth`
 * state dict (MiniMind's), its shape read from the tensors or given.
 */
export {
  type LoadedModel,
  loadModel,
  type LoadModelOptions,
  type TokenizerFiles as ModelTokenizerFiles,
} from "./io/model_files.ts";
/** A model shape asked for by preset name or config file. */
export { type RequestedShape, requestedShape } from "./io/model_config.ts";
/** PyTorch `.pth` state dicts, read without running their pickles. */
/** Special token ids and `generation_config.json` contents, as checkpoints carry them. */
export {
  type ParsedGenerationConfig,
  type SamplingDefaults,
  type SpecialTokenIds,
} from "./io/hf_config.ts";
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
} from "./io/safetensors.ts";
/** Tokenizers and chat templates (Hugging Face files), streaming detokenization. */
export {
  type ChatMessage,
  type ChatTemplateOptions,
  type DecodeOptions,
  type JsonValue,
  StreamingDecoder,
  type TemplateMessage,
  TextTokenizer,
} from "./data/tokenizer.ts";
/** The one batch type and the next-token shift of a token row. */
export { type Batch, emptyBatch, type RowTokens, setRow } from "./data/batch.ts";
/** The training data stream: JSONL or token shards to shuffled, resumable batches. */
export {
  type DataCounters,
  type DataPosition,
  type DataStats,
  DataStream,
  type DataStreamOptions,
  type ReaderPosition,
  type SampleOrigin,
} from "./data/stream.ts";
/** The two kinds of training data. */
/** A LoRA run's settings as a checkpoint records them. */
export { type LoraRun } from "./train/lora.ts";
export { type DataKind, type RecordWhere } from "./data/sources.ts";
/** The manifest of pre-tokenized shards (`trainer tokenize`). */
export { type ShardManifest } from "./data/shards.ts";
/** SFT rendering (MiniMind's tool and reasoning records included) and the assistant-only loss mask. */
export {
  assistantMask,
  type ChatTokenizer,
  maskRendered,
  renderConversation,
  type SftConversation,
  type SftMessage,
} from "./data/sft.ts";
/** MiniMind's SFT augmentations (random system prompt, empty-think stripping), seeded per sample. */
export {
  EMPTY_THINK,
  MINIMIND_SYSTEM_PROMPTS,
  NO_AUGMENTATION,
  renderAugmented,
  sampleRng,
  type SftAugmentation,
} from "./data/sft_augment.ts";
/** Pretrain packing, or MiniMind's one padded document per row. */
export {
  type DocumentTokenizer,
  documentTokens,
  packDocuments,
  type Packing,
  padDocument,
} from "./data/pretrain.ts";
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
/** DPO: the embedded preference pairs, MiniMind's dpo.jsonl records, the step's figures. */
export {
  embeddedPreferences,
  type PreferenceRecord,
  type PreferenceSet,
  writePreferenceSet,
} from "./data/preferences.ts";
export { type DpoRecord, parseDpoRecord } from "./data/sources.ts";
export { type StreamKind } from "./data/stream.ts";
export { dpoPairs, type DpoStats } from "./model/preference.ts";
export { DPO_STATS, DPO_STATS_FLOATS, dpoLoss, dpoRowWeights } from "./kernels/dpo.ts";
export { dpoLossReference, type DpoReferenceResult } from "./model/dpo_reference.ts";
/** The learning-rate schedule. */
export { cosineWithWarmup, type Schedule } from "./optim/schedule.ts";
/** A training run: typed options, setup, the loop. */
export {
  defaultLr,
  isTinyShape,
  type PreparedRun,
  prepareRun,
  TINY_LR,
  TRAIN_DEFAULTS,
  type TrainKind,
  type TrainOptions,
} from "./train/setup.ts";
export { type RunIo, runPrepared } from "./train/run.ts";
export {
  type RunConfig,
  type RunStart,
  type TrainContext,
  type TrainerState,
  trainLoop,
  type TrainResult,
} from "./train/loop.ts";
/** The PRNG every random choice uses. */
export {
  loadPth,
  MAX_PICKLE_BYTES,
  type PthDtype,
  type PthTensor,
  readPthStateDict,
} from "./io/pth.ts";
export {
  type Communicator,
  type CommunicatorOptions,
  detectLaunch,
  type LaunchInfo,
  openCommunicator,
  singleProcess,
} from "./dist/comm.ts";
export { type AllreduceBandwidth, allreduceBandwidth } from "./dist/bandwidth.ts";
export { DataParallel } from "./train/distributed.ts";
export {
  chatPromptIds,
  fitConversation,
  type GenerationModel,
  type GenerationModelOptions,
  loadGenerationModel,
  resolveMaxNewTokens,
  resolveSampling,
  stopIds,
  textPromptIds,
  TokenStreamer,
} from "./infer/session.ts";
export { type EngineOptions, type Job, type RunResult, ServeEngine } from "./serve/engine.ts";
export { type FinishReason, type GenerationParams } from "./serve/openai.ts";
export { type Release, SlotQueue } from "./serve/queue.ts";
export { type EnvReader } from "./dist/mpi.ts";
export {
  createHandler,
  type Handler,
  type ListenOptions,
  type RunningServer,
  serve,
  type ServerOptions,
} from "./serve/server.ts";
export { Rng, type RngState } from "./util/random.ts";
/** Errors that carry a user-facing message. */
export { UsageError, UserError } from "./util/errors.ts";
