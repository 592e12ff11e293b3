/**
 * `loss.svg`: the train and eval loss curves with labelled axes, written beside
 * the checkpoint at each save. Plain SVG, readable in any browser.
 */

/** A curve's points: optimizer step and loss. */
export type Curve = { step: number; loss: number }[];

const W = 720;
const H = 420;
const M = { left: 64, right: 24, top: 36, bottom: 52 };

/** Round tick values covering [lo, hi]. */
function ticks(lo: number, hi: number, count = 6): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) ?? 10 * mag;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Number(v.toPrecision(12)));
  }
  return out;
}

function escapeXml(s: string): string {
  return s.replace(
    /[<>&"]/g,
    (c) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;" })[c]!,
  );
}

/** The SVG text of a loss plot. `title` goes on top. */
export function lossPlotSvg(train: Curve, evalCurve: Curve, title: string): string {
  const all = [...train, ...evalCurve].filter((p) => Number.isFinite(p.loss));
  const x0 = 0;
  const x1 = Math.max(1, ...all.map((p) => p.step));
  let y0 = Math.min(...all.map((p) => p.loss));
  let y1 = Math.max(...all.map((p) => p.loss));
  if (!Number.isFinite(y0)) [y0, y1] = [0, 1];
  if (y1 - y0 < 1e-6) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const pad = (y1 - y0) * 0.05;
  y0 = Math.max(0, y0 - pad);
  y1 += pad;
  const px = (s: number) => M.left + ((s - x0) / (x1 - x0)) * (W - M.left - M.right);
  const py = (l: number) => H - M.bottom - ((l - y0) / (y1 - y0)) * (H - M.top - M.bottom);
  const path = (c: Curve) =>
    c.filter((p) => Number.isFinite(p.loss)).map((p, i) =>
      `${i ? "L" : "M"}${px(p.step).toFixed(1)},${py(p.loss).toFixed(1)}`
    ).join(" ");
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${escapeXml(title)}</text>`,
  ];
  for (const t of ticks(y0, y1)) {
    const y = py(t).toFixed(1);
    parts.push(
      `<line x1="${M.left}" y1="${y}" x2="${W - M.right}" y2="${y}" stroke="#e5e5e5"/>`,
      `<text x="${M.left - 6}" y="${y}" text-anchor="end" dominant-baseline="middle">${t}</text>`,
    );
  }
  for (const t of ticks(x0, x1).filter((t) => Number.isInteger(t))) {
    const x = px(t).toFixed(1);
    parts.push(
      `<line x1="${x}" y1="${H - M.bottom}" x2="${x}" y2="${H - M.bottom + 4}" stroke="#333"/>`,
      `<text x="${x}" y="${H - M.bottom + 18}" text-anchor="middle">${t}</text>`,
    );
  }
  parts.push(
    `<line x1="${M.left}" y1="${H - M.bottom}" x2="${W - M.right}" y2="${
      H - M.bottom
    }" stroke="#333"/>`,
    `<line x1="${M.left}" y1="${M.top}" x2="${M.left}" y2="${H - M.bottom}" stroke="#333"/>`,
    `<text x="${(M.left + W - M.right) / 2}" y="${
      H - 12
    }" text-anchor="middle">optimizer step</text>`,
    `<text transform="translate(16 ${
      (M.top + H - M.bottom) / 2
    }) rotate(-90)" text-anchor="middle">loss (cross-entropy, nats)</text>`,
  );
  if (train.length > 0) {
    parts.push(`<path d="${path(train)}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>`);
  }
  if (evalCurve.length > 0) {
    parts.push(`<path d="${path(evalCurve)}" fill="none" stroke="#d62728" stroke-width="2"/>`);
    for (const p of evalCurve.filter((p) => Number.isFinite(p.loss))) {
      parts.push(
        `<circle cx="${px(p.step).toFixed(1)}" cy="${
          py(p.loss).toFixed(1)
        }" r="3" fill="#d62728"/>`,
      );
    }
  }
  const lx = W - M.right - 120;
  parts.push(
    `<line x1="${lx}" y1="${M.top + 8}" x2="${lx + 24}" y2="${
      M.top + 8
    }" stroke="#1f77b4" stroke-width="2"/>`,
    `<text x="${lx + 30}" y="${M.top + 8}" dominant-baseline="middle">train</text>`,
    `<line x1="${lx}" y1="${M.top + 26}" x2="${lx + 24}" y2="${
      M.top + 26
    }" stroke="#d62728" stroke-width="2"/>`,
    `<text x="${lx + 30}" y="${M.top + 26}" dominant-baseline="middle">eval</text>`,
    "</svg>",
  );
  return parts.join("\n") + "\n";
}
