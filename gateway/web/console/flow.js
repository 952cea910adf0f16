// The business's flow drawn as a diagram: stages in layers from the entry stage down (each stage
// one step further from the entry than the stage it is first reached from), transitions as arrows.
// Forward arrows go straight down; arrows back up, within a layer, or to the same stage curve round
// the right-hand side. Each arrow carries a number, and the list under the drawing says each
// transition in words with its condition: the text alternative of the drawing, and readable at any
// width. The current stage is filled and labelled "current stage".

import { el, svg } from "./dom.js";

const NODE_W = 150;
const NODE_H = 44;
const GAP_X = 26;
const GAP_Y = 58;
const PAD = 14;
const TOP = 30; // room for the "start" arrow above the entry stage
const LANE = 16; // distance between the curved arrows on the right

let drawings = 0; // marker ids must be unique in the document (several panes show a flow)

/** Where each stage and arrow goes. Pure: stages {name, is_entry}, transitions {from, to}. */
export function layout(flow) {
  const names = flow.stages.map((s) => s.name);
  const known = new Set(names);
  const next = new Map(names.map((n) => [n, []]));
  for (const t of flow.transitions) if (known.has(t.from) && known.has(t.to)) next.get(t.from).push(t.to);
  const entry = flow.stages.find((s) => s.is_entry) || flow.stages[0];
  const layerOf = new Map();
  if (entry) {
    layerOf.set(entry.name, 0);
    const queue = [entry.name];
    while (queue.length) {
      const n = queue.shift();
      for (const m of next.get(n)) {
        if (!layerOf.has(m)) {
          layerOf.set(m, layerOf.get(n) + 1);
          queue.push(m);
        }
      }
    }
  }
  const unreachable = Math.max(-1, ...layerOf.values()) + 1;
  for (const n of names) if (!layerOf.has(n)) layerOf.set(n, unreachable);
  const rows = [];
  for (const n of names) (rows[layerOf.get(n)] ||= []).push(n);
  const dense = rows.filter(Boolean);
  const widest = Math.max(1, ...dense.map((r) => r.length));
  const inner = widest * NODE_W + (widest - 1) * GAP_X;
  const nodes = new Map();
  dense.forEach((row, y) => {
    const rowWidth = row.length * NODE_W + (row.length - 1) * GAP_X;
    row.forEach((name, x) => {
      const left = PAD + (inner - rowWidth) / 2 + x * (NODE_W + GAP_X);
      nodes.set(name, { name, x: left, y: TOP + y * (NODE_H + GAP_Y), layer: layerOf.get(name) });
    });
  });
  let lanes = 0;
  const edges = flow.transitions
    .filter((t) => nodes.has(t.from) && nodes.has(t.to))
    .map((t, i) => {
      const a = nodes.get(t.from);
      const b = nodes.get(t.to);
      if (a !== b && b.layer > a.layer) return { t, n: i + 1, ...straight(a, b) };
      lanes++;
      return { t, n: i + 1, ...curved(a, b, PAD + inner + lanes * LANE) };
    });
  const width = PAD * 2 + inner + lanes * LANE + (lanes ? 12 : 0);
  const height = TOP + dense.length * (NODE_H + GAP_Y) - GAP_Y + PAD;
  return { nodes, edges, width, height, entry: entry ? entry.name : null };
}

function straight(a, b) {
  const x1 = a.x + NODE_W / 2;
  const y1 = a.y + NODE_H;
  const x2 = b.x + NODE_W / 2;
  const y2 = b.y;
  return { d: `M${x1},${y1} L${x2},${y2}`, label: { x: (x1 + x2) / 2, y: (y1 + y2) / 2 } };
}

function curved(a, b, laneX) {
  const x1 = a.x + NODE_W;
  const y1 = a.y + NODE_H / 2 + (a === b ? -8 : 0);
  const x2 = b.x + NODE_W;
  const y2 = b.y + NODE_H / 2 + (a === b ? 8 : 0);
  const d = `M${x1},${y1} C${laneX},${y1} ${laneX},${y2} ${x2 + 2},${y2}`;
  return { d, label: { x: x1 + (laneX - x1) * 0.75, y: (y1 + y2) / 2 } };
}

/** The stage's name fitted into a node. */
function fit(name) {
  return name.length > 18 ? name.slice(0, 17) + "…" : name;
}

/**
 * A <figure> with the drawing and the list of transitions. `current` is the conversation's stage.
 * @param {{stages: object[], transitions: object[]}} flow
 */
export function drawFlow(flow, current) {
  if (!flow.stages.length) {
    return el(
      "p",
      { class: "muted" },
      `This business has no flow configured: its conversations stay in the stage "${current || "default"}".`,
    );
  }
  const plan = layout(flow);
  const id = `arrow-${++drawings}`;
  const described = flow.stages
    .map((s) => s.name + (s.name === current ? " (current)" : "") + (s.name === plan.entry ? " (start)" : ""))
    .join(", ");
  const drawing = svg(
    "svg",
    {
      class: "flow-svg",
      viewBox: `0 0 ${plan.width} ${plan.height}`,
      width: plan.width,
      role: "img",
      "aria-label": `The flow's stages: ${described}. The transitions are listed below.`,
    },
    svg(
      "defs",
      {},
      svg(
        "marker",
        { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
        svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" }),
      ),
    ),
  );
  if (plan.entry) {
    const start = plan.nodes.get(plan.entry);
    const x = start.x + NODE_W / 2;
    drawing.append(
      svg("path", { d: `M${x},4 L${x},${start.y - 1}`, class: "edge", "marker-end": `url(#${id})` }),
      svg("text", { x: x + 8, y: 16, class: "start", text: "start" }),
    );
  }
  for (const e of plan.edges) {
    drawing.append(svg("path", { d: e.d, class: "edge", "marker-end": `url(#${id})` }));
  }
  for (const stage of flow.stages) drawing.append(node(plan.nodes.get(stage.name), stage, stage.name === current));
  for (const e of plan.edges) {
    drawing.append(
      svg(
        "g",
        { class: "edge-label" },
        svg("circle", { cx: e.label.x, cy: e.label.y, r: 9 }),
        svg("text", { x: e.label.x, y: e.label.y + 4, "text-anchor": "middle", text: String(e.n) }),
      ),
    );
  }
  const list = el("ol", { class: "transitions" });
  for (const e of plan.edges) {
    const item = el("li", { value: e.n }, `${e.t.from} → ${e.t.to}: `);
    if (e.t.condition) item.append("when ", el("code", {}, e.t.condition));
    else item.append("always");
    list.append(item);
  }
  const caption = el("figcaption", {}, "Transitions, by their numbers in the drawing:");
  const known = flow.stages.some((s) => s.name === current);
  const note = known ? null : el("p", { class: "muted" }, `The conversation's stage "${current}" is not in the flow (it changed since).`);
  return el("figure", { class: "flow" }, el("div", { class: "flow-scroll" }, drawing), note, caption, list);
}

function node(at, stage, isCurrent) {
  const g = svg("g", { class: "node" + (isCurrent ? " current" : ""), "data-stage": stage.name });
  g.append(
    svg("title", { text: stage.description ? `${stage.name}: ${stage.description}` : stage.name }),
    svg("rect", { x: at.x, y: at.y, width: NODE_W, height: NODE_H, rx: 9 }),
    svg("text", {
      x: at.x + NODE_W / 2,
      y: at.y + (isCurrent ? 18 : 27),
      "text-anchor": "middle",
      class: "name",
      text: fit(stage.name),
    }),
  );
  if (isCurrent) {
    g.append(svg("text", { x: at.x + NODE_W / 2, y: at.y + 35, "text-anchor": "middle", class: "now", text: "current stage" }));
  }
  return g;
}
