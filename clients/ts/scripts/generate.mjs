// Writes src/generated/api.ts from the protocol's JSON Schemas
// (protocol/schema/index.json and the files it names, made by
// `python -m protocol.schema`): a type for every method's params and result
// and every event's data, the method table the client dispatches on, and a
// typed function per method.
//
//   node scripts/generate.mjs [schema dir] [output file]
//
// A small converter of our own rather than a general JSON Schema tool: the
// schemas come from pydantic and use a known subset (objects, arrays, anyOf,
// enum, $ref to $defs), and the wire types need our own mapping (a msgpack
// timestamp is a Timestamp in results but also a Date or an RFC 3339 string
// in params; money and ids are strings).

import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const schemaDir = resolve(process.argv[2] ?? join(here, "../../../protocol/schema"));
const outFile = resolve(process.argv[3] ?? join(here, "../src/generated/api.ts"));

const index = JSON.parse(readFileSync(join(schemaDir, "index.json"), "utf8"));
const load = (rel) => JSON.parse(readFileSync(join(schemaDir, rel), "utf8"));

const pascal = (s) =>
  s.split(/[^A-Za-z0-9]+/).filter(Boolean).map((w) => w[0].toUpperCase() + w.slice(1)).join("");
const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
const key = (k) => (IDENT.test(k) ? k : JSON.stringify(k));

// Named types from $defs, by name and direction ("in": params, "out":
// results and events). One name used in both directions with different
// shapes gets an "Input" suffix on the params side.
const named = new Map(); // emitted name -> body
const docs = new Map(); // emitted name -> the schema's description
const defNames = new Map(); // `${dir}:${file}:${def}` -> emitted name

function isTime(s) {
  return s["x-msgpack"] === "timestamp" || s.format === "date-time";
}
function isMoney(s) {
  return (s["x-money"] !== undefined && s["x-money"] !== false) || s.format === "decimal";
}
function isNullable(s) {
  return (s.anyOf ?? s.oneOf ?? []).some((u) => u.type === "null");
}

function conv(s, ctx, indent) {
  if (s === true || s === undefined) return "unknown";
  if (s === false) return "never";
  if (s.$ref) {
    const m = /^#\/\$defs\/(.+)$/.exec(s.$ref);
    if (!m) throw new Error(`unsupported $ref ${s.$ref} in ${ctx.file}`);
    return defName(m[1], ctx);
  }
  if (isTime(s)) return ctx.dir === "in" ? "TimeInput" : "Timestamp";
  // Money params may also be integers on the wire; the SDK sends strings only,
  // so that no float can slip through.
  if (isMoney(s) && !isNullable(s)) return "Money";
  if (s.const !== undefined) return JSON.stringify(s.const);
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  const union = s.anyOf ?? s.oneOf;
  if (union) {
    const parts = [...new Set(union.map((u) => conv(u, ctx, indent)))];
    return parts.length === 1 ? parts[0] : parts.map((p) => (p.includes("=>") ? `(${p})` : p)).join(" | ");
  }
  if (s.allOf && s.allOf.length === 1) return conv(s.allOf[0], ctx, indent);
  const type = s.type;
  if (Array.isArray(type)) return type.map((t) => conv({ ...s, type: t }, ctx, indent)).join(" | ");
  switch (type) {
    case "string":
      if (isMoney(s)) return "Money";
      if (s.format === "uuid") return "Uuid";
      return "string";
    case "integer":
    case "number":
      return "number";
    case "boolean":
      return "boolean";
    case "null":
      return "null";
    case "array":
      if (Array.isArray(s.prefixItems)) return `[${s.prefixItems.map((i) => conv(i, ctx, indent)).join(", ")}]`;
      return `Array<${conv(s.items, ctx, indent)}>`;
    case "object":
    case undefined:
      if (s.properties || type === "object") return object(s, ctx, indent);
      return "unknown";
    default:
      throw new Error(`unsupported type ${type} in ${ctx.file}`);
  }
}

function object(s, ctx, indent) {
  const props = s.properties ?? {};
  const required = new Set(s.required ?? []);
  const pad = "  ".repeat(indent + 1);
  const lines = [];
  for (const [k, v] of Object.entries(props)) {
    const doc = v.description ? `${pad}/** ${v.description.replace(/\*\//g, "* /")} */\n` : "";
    // A param with a default may be left out; a result field is always there.
    const optional = !required.has(k) ? "?" : "";
    lines.push(`${doc}${pad}${key(k)}${optional}: ${conv(v, ctx, indent + 1)};`);
  }
  const extra = s.additionalProperties;
  if (extra && extra !== false && Object.keys(props).length === 0) {
    return `Record<string, ${extra === true ? "unknown" : conv(extra, ctx, indent)}>`;
  }
  if (lines.length === 0) return extra === false ? "Record<string, never>" : "Record<string, unknown>";
  return `{\n${lines.join("\n")}\n${"  ".repeat(indent)}}`;
}

function defName(def, ctx) {
  const id = `${ctx.dir}:${ctx.file}:${def}`;
  if (defNames.has(id)) return defNames.get(id);
  const schema = ctx.defs[def];
  if (!schema) throw new Error(`no $defs/${def} in ${ctx.file}`);
  let name = pascal(def);
  defNames.set(id, name); // before converting: a recursive type refers to itself
  const body = conv(schema, ctx, 0);
  const existing = named.get(name);
  if (existing !== undefined && existing !== body) {
    const alt = ctx.dir === "in" ? `${name}Input` : `${name}Output`;
    const other = named.get(alt);
    if (other !== undefined && other !== body) throw new Error(`two shapes named ${def} (${ctx.file})`);
    name = alt;
    defNames.set(id, name);
  }
  named.set(name, body);
  if (schema.description) docs.set(name, schema.description);
  return name;
}

function top(rel, dir, typeName) {
  const schema = load(rel);
  const ctx = { file: rel, dir, defs: schema.$defs ?? {} };
  const body = conv(schema, ctx, 0);
  // A result that is an object of its own (users.me's OwnUser) is named after it.
  const own = schema.title ? pascal(schema.title) : undefined;
  named.set(typeName, own && own !== typeName && named.get(own) === body ? own : body);
  if (schema.description) docs.set(typeName, schema.description);
  return typeName;
}

const methods = [...index.methods].sort((a, b) => a.name.localeCompare(b.name));
const events = [...index.events].sort((a, b) => a.name.localeCompare(b.name));
const methodRows = methods.map((m) => ({
  ...m,
  paramsType: top(m.params, "in", `${pascal(m.name)}Params`),
  // Nothing required (users.me, bookings.list...): the params may be left out.
  paramsOptional: (load(m.params).required ?? []).length === 0,
  resultType: top(m.result, "out", `${pascal(m.name)}Result`),
}));
const eventRows = events.map((e) => ({ ...e, dataType: top(e.data, "out", `${pascal(e.name)}Event`) }));

// Methods grouped by the part of the name before the dot: client.chat.send().
const groups = new Map();
for (const m of methodRows) {
  const dot = m.name.indexOf(".");
  const group = m.name.slice(0, dot);
  const fn = m.name.slice(dot + 1).replace(/[^A-Za-z0-9]+(.)/g, (_, c) => c.toUpperCase());
  if (!groups.has(group)) groups.set(group, []);
  groups.get(group).push({ ...m, fn });
}

const out = [];
out.push("// Generated by scripts/generate.mjs from protocol/schema/: do not edit by hand.");
out.push("/* eslint-disable */");
out.push('import type { CallOptions } from "../options.js";');
out.push('import type { Timestamp } from "../timestamp.js";');
out.push("");
out.push("/** A canonical lowercase UUID string. */");
out.push("export type Uuid = string;");
out.push('/** Money: a decimal string with two places, "25.00" (never a float). */');
out.push("export type Money = string;");
out.push("/** A time sent to the server: a Timestamp (exact), a Date (milliseconds) or an RFC 3339 string with an offset. */");
out.push("export type TimeInput = Timestamp | Date | string;");
out.push("");
const comment = (text, pad = "") =>
  `${pad}/**\n${text.trim().replace(/\*\//g, "* /").split("\n").map((l) => `${pad} * ${l}`.trimEnd()).join("\n")}\n${pad} */`;
for (const [name, body] of [...named.entries()].sort(([a], [b]) => a.localeCompare(b))) {
  if (docs.has(name)) out.push(comment(docs.get(name)));
  out.push(body.startsWith("{") ? `export interface ${name} ${body}` : `export type ${name} = ${body};`);
  out.push("");
}
out.push("/** Every method: its params, its result, and whether it needs an authenticated socket. */");
out.push("export interface Methods {");
for (const m of methodRows) {
  out.push(`  ${JSON.stringify(m.name)}: { params: ${m.paramsType}; result: ${m.resultType}; auth: ${m.auth} };`);
}
out.push("}");
out.push("");
out.push("export type MethodName = keyof Methods;");
out.push("");
out.push("/** Whether each method needs an authenticated socket. */");
out.push("export const METHOD_AUTH: { readonly [M in MethodName]: boolean } = {");
for (const m of methodRows) out.push(`  ${JSON.stringify(m.name)}: ${m.auth},`);
out.push("};");
out.push("");
out.push("/** Every server event and its data. */");
out.push("export interface Events {");
for (const e of eventRows) out.push(`  ${JSON.stringify(e.name)}: ${e.dataType};`);
out.push("}");
out.push("");
out.push("export type EventName = keyof Events;");
out.push("");
out.push("type Call = <M extends MethodName>(method: M, params: Methods[M][\"params\"], options?: CallOptions) => Promise<Methods[M][\"result\"]>;");
out.push("");
out.push("/** A typed function per method, grouped by service: api.chat.send({...}). */");
out.push("export interface Api {");
for (const [group, ms] of groups) {
  out.push(`  readonly ${key(group)}: {`);
  for (const m of ms) {
    const p = m.paramsOptional ? "params?" : "params";
    out.push(`    ${key(m.fn)}(${p}: ${m.paramsType}, options?: CallOptions): Promise<${m.resultType}>;`);
  }
  out.push("  };");
}
out.push("}");
out.push("");
out.push("export function bindApi(call: Call): Api {");
out.push("  return {");
for (const [group, ms] of groups) {
  out.push(`    ${key(group)}: {`);
  for (const m of ms) {
    out.push(`      ${key(m.fn)}: (params?: any, options?: CallOptions) => call(${JSON.stringify(m.name)}, params ?? {}, options),`);
  }
  out.push("    },");
}
out.push("  };");
out.push("}");
out.push("");

mkdirSync(dirname(outFile), { recursive: true });
writeFileSync(outFile, out.join("\n"));
console.log(`wrote ${outFile}: ${methodRows.length} methods, ${eventRows.length} events`);
