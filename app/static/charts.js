// Hand-written SVG charts for the dashboard: line charts with axes, grid and legend.
// No library, no network: everything is drawn from the numbers the API returns.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2759c7", "#d1495b", "#1d7f46", "#a86400", "#7b3fa0", "#0f7c8c", "#6b6f7a", "#c2185b"];

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  // About `count` round tick values covering [lo, hi].
  function ticks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }

  function fmt(v, step) {
    const digits = step >= 1 ? 0 : Math.min(4, Math.ceil(-Math.log10(step)));
    return v.toFixed(digits);
  }

  // series: [{name, color, points: [[x, y], ...], dashed}]
  // options: {title, xLabel, yLabel, yMin, yMax, percent}
  function line(container, series, options) {
    const o = options || {};
    const W = 640, H = 330, m = { l: 56, r: 16, t: 30, b: 66 };
    container.innerHTML = "";
    container.classList.add("chart");
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": o.title || "chart" }, container);
    if (o.title) {
      const t = el("text", { x: m.l, y: 18, class: "title" }, svg);
      t.textContent = o.title;
    }
    const pts = series.flatMap((s) => s.points.filter((p) => p[1] !== null && isFinite(p[1])));
    if (!pts.length) {
      const t = el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg);
      t.textContent = o.empty || "no epochs yet";
      return svg;
    }
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x0 === x1) { x0 -= 0.5; x1 += 0.5; }
    let y0 = o.yMin !== undefined ? o.yMin : Math.min(...ys);
    let y1 = o.yMax !== undefined ? o.yMax : Math.max(...ys);
    if (y0 === y1) { y0 -= 0.05; y1 += 0.05; }
    const pad = (y1 - y0) * 0.06;
    if (o.yMin === undefined) y0 -= pad;
    if (o.yMax === undefined) y1 += pad;
    const px = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
    const py = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);

    const yt = ticks(y0, y1, 5);
    const ystep = yt.length > 1 ? yt[1] - yt[0] : 1;
    for (const v of yt) {
      if (v < y0 - 1e-12 || v > y1 + 1e-12) continue;
      el("line", { x1: m.l, x2: W - m.r, y1: py(v), y2: py(v), class: "grid" }, svg);
      const t = el("text", { x: m.l - 6, y: py(v) + 4, "text-anchor": "end" }, svg);
      t.textContent = o.percent ? `${fmt(v * 100, ystep * 100)}%` : fmt(v, ystep);
    }
    const xt = ticks(x0, x1, Math.min(10, Math.max(1, Math.round(x1 - x0)))).filter((v) => Number.isInteger(v));
    for (const v of xt) {
      if (v < x0 || v > x1) continue;
      el("line", { x1: px(v), x2: px(v), y1: H - m.b, y2: H - m.b + 4, class: "axis" }, svg);
      const t = el("text", { x: px(v), y: H - m.b + 17, "text-anchor": "middle" }, svg);
      t.textContent = String(v);
    }
    el("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }, svg);
    el("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }, svg);
    if (o.xLabel) {
      const t = el("text", { x: (m.l + W - m.r) / 2, y: H - m.b + 33, "text-anchor": "middle" }, svg);
      t.textContent = o.xLabel;
    }
    if (o.yLabel) {
      const t = el("text", { x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(m.t + H - m.b) / 2})` }, svg);
      t.textContent = o.yLabel;
    }

    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const good = s.points.filter((p) => p[1] !== null && isFinite(p[1]));
      if (good.length > 1) {
        const d = good.map((p, k) => `${k ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join("");
        el("path", { d, fill: "none", stroke: color, "stroke-width": 2.2, "stroke-dasharray": s.dashed ? "6 4" : "none", "stroke-linejoin": "round", class: "series", "data-name": s.name }, svg);
      }
      for (const p of good) {
        el("circle", { cx: px(p[0]), cy: py(p[1]), r: good.length > 40 ? 1.5 : 3, fill: s.dashed ? "#fff" : color, stroke: color, "stroke-width": 1.5, class: "point" }, svg);
      }
    });

    // Legend under the x axis, wrapping into rows.
    const legend = el("g", { class: "legend" }, svg);
    let lx = m.l, ly = H - 14;
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const width = 44 + 7.6 * s.name.length;
      if (lx + width > W - m.r) { lx = m.l; ly += 16; }
      el("line", { x1: lx, x2: lx + 22, y1: ly - 4, y2: ly - 4, stroke: color, "stroke-width": 2.5, "stroke-dasharray": s.dashed ? "5 3" : "none" }, legend);
      const t = el("text", { x: lx + 27, y: ly }, legend);
      t.textContent = s.name;
      lx += width;
    });
    return svg;
  }

  return { line, PALETTE };
})();
