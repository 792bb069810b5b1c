/** What the benchmark prints and writes: the terminal table, `latest.json` and the SVG plot. */

/** One measured phase of one system in one scenario. */
export interface Row {
  scenario: string;
  system: string;
  /** Which phase of the scenario (a burst, or one step of a sweep). */
  phase: string;
  /** Offered load of a rate-driven phase, requests/s; null for a burst. */
  offered_rps: number | null;
  requests: number;
  throughput_rps: number;
  /** Rate between the 10th and 90th percentile of answer times (a burst's saturated stretch). */
  steady_rps: number | null;
  p50_ms: number | null;
  p90_ms: number | null;
  p99_ms: number | null;
  max_ms: number | null;
  lost: number;
  duplicated: number;
  /** Answered, but with an error result. */
  errors: number;
  /** Sends the broker did not accept (not counted as lost). */
  send_errors: number;
  /** Mean batch size the requests ran in (from the results' timing); null when the system does not say. */
  mean_batch: number | null;
  /** Rate at which the load generator got its requests accepted, per second. */
  sent_rps: number;
  /** VmHWM of the system's process, MB. */
  peak_rss_mb: number | null;
  /** VmHWM of that run's nats-server, MB (the backlog lives there). */
  nats_peak_rss_mb: number | null;
  /** That run's worker called directly (no queue), p50 ms: one request, and a full batch. */
  worker_single_ms: number | null;
  worker_max_batch_ms: number | null;
  /** CPU time of the system's process per request of the phase, ms (process CPU time / requests). */
  cpu_ms_per_request?: number | null;
  /** The same for that run's nats-server. */
  nats_cpu_ms_per_request?: number | null;
  /** The same for that run's worker process (systems that call it; the baselines without a worker do not). */
  worker_cpu_ms_per_request?: number | null;
  /** Consumers on INFER_REQ: right after the phase, and after the idle measurement. */
  consumers_after?: number | null;
  consumers_later?: number | null;
  /** CPU of the system and nats-server while idle after the phases, % of one core. */
  idle_cpu_percent?: number | null;
  /** Latency by request priority, when the scenario mixes priorities. */
  by_priority?: Partial<Record<"high" | "normal" | "low", { answered: number; p50_ms: number | null; p99_ms: number | null }>>;
}

const round = (v: number | null | undefined, digits = 1): number | null =>
  v === null || v === undefined || !Number.isFinite(v) ? null : Math.round(v * 10 ** digits) / 10 ** digits;

export { round };

function fmt(v: number | null, digits = 1): string {
  return v === null ? "-" : v.toFixed(digits);
}

/** A plain-text table with right-aligned numbers. */
export function renderTable(rows: readonly Row[]): string {
  const header = ["scenario", "system", "phase", "requests", "rps", "p50 ms", "p90 ms", "p99 ms", "max ms", "lost", "dup", "err", "batch", "rss MB"];
  const body = rows.map((r) => [
    r.scenario,
    r.system,
    r.phase,
    String(r.requests),
    fmt(r.throughput_rps, 0),
    fmt(r.p50_ms),
    fmt(r.p90_ms),
    fmt(r.p99_ms),
    fmt(r.max_ms),
    String(r.lost),
    String(r.duplicated),
    String(r.errors + r.send_errors),
    fmt(r.mean_batch),
    fmt(r.peak_rss_mb, 0),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const left = new Set([0, 1, 2]);
  const line = (cells: string[]): string =>
    cells.map((c, i) => (left.has(i) ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ").trimEnd();
  const rule = widths.map((w) => "-".repeat(w)).join("  ");
  return [line(header), rule, ...body.map(line)].join("\n");
}

export interface SweepSeries {
  system: string;
  points: Array<{ offered: number; p50: number; p99: number; throughput: number }>;
}

const COLORS: Record<string, string> = { sluice: "#1f6fb4", "jetstream-raw": "#d2452c" };
const FALLBACK_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

function esc(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** Tick values of a linear axis from 0 to max. */
function linearTicks(max: number): number[] {
  const rough = max / 6;
  const mag = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= rough) ?? rough;
  const out: number[] = [];
  for (let v = 0; v <= max + 1e-9; v += step) out.push(v);
  return out;
}

/**
 * Latency against offered load, one colour per system, p50 solid and p99 dashed, latency on a
 * log scale (a saturated system's latency grows by orders of magnitude). A dashed vertical line
 * marks the device's theoretical maximum when given.
 */
export function renderLatencySvg(opts: {
  title: string;
  subtitle: string;
  series: readonly SweepSeries[];
  deviceMaxRps?: number;
  /** The device's time for a single request, ms: no system can answer faster. */
  deviceSingleMs?: number;
}): string {
  const W = 820;
  const H = 500;
  const m = { left: 72, right: 190, top: 64, bottom: 56 };
  const pw = W - m.left - m.right;
  const ph = H - m.top - m.bottom;
  const all = opts.series.flatMap((s) => s.points);
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${W}" height="${H}" fill="#ffffff"/>`);
  out.push(`<text x="${m.left}" y="26" font-size="16" font-weight="bold">${esc(opts.title)}</text>`);
  out.push(`<text x="${m.left}" y="46" fill="#555">${esc(opts.subtitle)}</text>`);
  if (all.length === 0) {
    out.push(`<text x="${W / 2}" y="${H / 2}" text-anchor="middle" fill="#777">no load sweep in this run</text>`);
    out.push("</svg>");
    return out.join("\n");
  }
  const xMax = Math.max(...all.map((p) => p.offered), opts.deviceMaxRps ?? 0) * 1.08;
  const lats = [...all.flatMap((p) => [p.p50, p.p99]), opts.deviceSingleMs ?? Number.NaN].filter((v) => Number.isFinite(v) && v > 0);
  const yLo = 10 ** Math.floor(Math.log10(Math.max(0.1, Math.min(...lats))));
  const yHi = 10 ** Math.ceil(Math.log10(Math.max(yLo * 10, ...lats)));
  const x = (v: number): number => m.left + (v / xMax) * pw;
  const y = (v: number): number => m.top + ph - ((Math.log10(Math.max(v, yLo)) - Math.log10(yLo)) / (Math.log10(yHi) - Math.log10(yLo))) * ph;

  // Grid and axes.
  for (let d = yLo; d <= yHi * 1.0001; d *= 10) {
    for (const k of [1, 2, 5]) {
      const v = d * k;
      if (v > yHi * 1.0001) break;
      const yy = y(v).toFixed(1);
      out.push(`<line x1="${m.left}" x2="${m.left + pw}" y1="${yy}" y2="${yy}" stroke="${k === 1 ? "#ddd" : "#f0f0f0"}"/>`);
      if (k === 1 || (k === 5 && yHi / yLo <= 100))
        out.push(`<text x="${m.left - 8}" y="${yy}" text-anchor="end" dominant-baseline="middle">${v >= 1 ? v : v.toFixed(1)}</text>`);
    }
  }
  for (const t of linearTicks(xMax)) {
    const xx = x(t).toFixed(1);
    out.push(`<line x1="${xx}" x2="${xx}" y1="${m.top}" y2="${m.top + ph}" stroke="#f0f0f0"/>`);
    out.push(`<text x="${xx}" y="${m.top + ph + 18}" text-anchor="middle">${t}</text>`);
  }
  out.push(`<rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}" fill="none" stroke="#888"/>`);
  out.push(`<text x="${m.left + pw / 2}" y="${H - 14}" text-anchor="middle">offered load (requests/s)</text>`);
  out.push(
    `<text x="18" y="${m.top + ph / 2}" text-anchor="middle" transform="rotate(-90 18 ${m.top + ph / 2})">latency (ms, log scale)</text>`,
  );
  if (opts.deviceMaxRps !== undefined && Number.isFinite(opts.deviceMaxRps)) {
    const xx = x(opts.deviceMaxRps).toFixed(1);
    out.push(`<line x1="${xx}" x2="${xx}" y1="${m.top}" y2="${m.top + ph}" stroke="#444" stroke-dasharray="2 4"/>`);
    out.push(`<text x="${xx}" y="${m.top - 6}" text-anchor="middle" fill="#444">device max ${opts.deviceMaxRps.toFixed(0)}/s</text>`);
  }

  if (opts.deviceSingleMs !== undefined && opts.deviceSingleMs > 0) {
    const yy = y(opts.deviceSingleMs).toFixed(1);
    out.push(`<line x1="${m.left}" x2="${m.left + pw}" y1="${yy}" y2="${yy}" stroke="#444" stroke-dasharray="2 4"/>`);
    out.push(`<text x="${m.left + pw - 4}" y="${Number(yy) - 6}" text-anchor="end" fill="#444">device time, one request: ${opts.deviceSingleMs} ms</text>`);
  }

  // Series.
  let legendY = m.top + 8;
  opts.series.forEach((s, i) => {
    const color = COLORS[s.system] ?? FALLBACK_COLORS[i % FALLBACK_COLORS.length]!;
    const pts = [...s.points].sort((a, b) => a.offered - b.offered);
    for (const [key, dash] of [
      ["p50", ""],
      ["p99", ' stroke-dasharray="6 4"'],
    ] as const) {
      const valid = pts.filter((p) => Number.isFinite(p[key]));
      if (valid.length === 0) continue;
      const d = valid.map((p, j) => `${j === 0 ? "M" : "L"}${x(p.offered).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
      out.push(`<path d="${d}" fill="none" stroke="${color}" stroke-width="2"${dash}/>`);
      for (const p of valid) {
        out.push(
          `<circle cx="${x(p.offered).toFixed(1)}" cy="${y(p[key]).toFixed(1)}" r="3" fill="${key === "p50" ? color : "#fff"}" stroke="${color}">` +
            `<title>${esc(s.system)} ${key} at ${p.offered}/s offered: ${p[key].toFixed(1)} ms (served ${p.throughput.toFixed(0)}/s)</title></circle>`,
        );
      }
    }
    const lx = m.left + pw + 16;
    out.push(`<line x1="${lx}" x2="${lx + 28}" y1="${legendY}" y2="${legendY}" stroke="${color}" stroke-width="2"/>`);
    out.push(`<text x="${lx + 34}" y="${legendY}" dominant-baseline="middle">${esc(s.system)} p50</text>`);
    legendY += 18;
    out.push(`<line x1="${lx}" x2="${lx + 28}" y1="${legendY}" y2="${legendY}" stroke="${color}" stroke-width="2" stroke-dasharray="6 4"/>`);
    out.push(`<text x="${lx + 34}" y="${legendY}" dominant-baseline="middle">${esc(s.system)} p99</text>`);
    legendY += 26;
  });
  out.push("</svg>");
  return out.join("\n");
}
