// Builds the demo into dist/ (served by the server at GET /demo): the page,
// its stylesheet, and one ES module bundling src/ with the SDK's sources
// (tsconfig.json maps @hangout/client to ../src).
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "dist");

await rm(out, { recursive: true, force: true });
await mkdir(out);
await build({
  entryPoints: [join(here, "src/main.ts")],
  outfile: join(out, "demo.js"),
  tsconfig: join(here, "tsconfig.json"),
  bundle: true,
  format: "esm",
  target: ["es2020"],
  minify: true,
  sourcemap: true,
  logLevel: "warning",
});
await copyFile(join(here, "index.html"), join(out, "index.html"));
await copyFile(join(here, "demo.css"), join(out, "demo.css"));
