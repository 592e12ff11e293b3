/**
 * Peak FP32 throughput of known adapters, for MFU. MFU is printed only when the
 * peak is known (from this table or `--peak-tflops`): a made-up peak would make
 * the figure dishonest. Dense FP32 (non-tensor-core) figures from the vendors'
 * data sheets.
 */
const PEAK_FP32_TFLOPS: [RegExp, number][] = [
  [/H100.*(SXM|HBM3)|H100$/i, 66.9],
  [/H100.*PCIe/i, 51.2],
  [/H200/i, 66.9],
  [/A100/i, 19.5],
  [/L40S/i, 91.6],
  [/RTX 4090/i, 82.6],
  [/RTX 3090/i, 35.6],
  [/A10G?\b/i, 31.2],
  [/T4\b/i, 8.1],
];

/** The FP32 peak in FLOP/s of an adapter named `name`, or undefined when unknown. */
export function peakFlopsFor(name: string): number | undefined {
  for (const [re, tflops] of PEAK_FP32_TFLOPS) if (re.test(name)) return tflops * 1e12;
  return undefined;
}
