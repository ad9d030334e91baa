#!/usr/bin/env node
// Type-check Grafana dashboard JSON files against @grafana/schema's Dashboard type.
//
//   node check.mjs FILE.json...      (check.sh is the same, with a set-up check first)
//
// Each file becomes `const dashboard: DashboardJson = <the file>;` and all are checked in one
// `tsc --noEmit --strict` run (one tsc start-up, not one per file). Grafana publishes no JSON Schema
// for the classic dashboard model, only these TypeScript types, and an object literal assigned to a
// declared type gets TypeScript's excess-property check: unknown keys, wrong types and bad enum
// values are errors. Panel options and query fields are loose in the schema itself and are not
// checked. tsc's messages are printed with the JSON file's own line and column.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const tsc = join(here, 'node_modules', 'typescript', 'bin', 'tsc');
const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: check.sh FILE.json...');
  process.exit(2);
}
if (!existsSync(tsc) || !existsSync(join(here, 'node_modules', '@grafana', 'schema', 'package.json'))) {
  console.error(`check: ${relative(process.cwd(), here) || '.'}/node_modules is missing; run make setup`);
  process.exit(2);
}

// The whole prefix sits on line 1, so the JSON's line N is the .ts file's line N.
const prefix = "import type { DashboardJson } from '../types'; const dashboard: DashboardJson = ";
const suffix = ';\nexport default dashboard;\n';

const tmp = mkdtempSync(join(here, '.check-'));
let failed = false;
const sources = new Map(); // generated .ts (as tsc prints it, relative to here) -> the JSON file
try {
  const inputs = [];
  files.forEach((file, i) => {
    let text;
    try {
      text = readFileSync(file, 'utf8');
      JSON.parse(text); // TypeScript would accept any expression: insist on JSON
    } catch (err) {
      console.error(`${file}: ${err.code === 'ENOENT' ? 'no such file' : `not JSON: ${err.message}`}`);
      failed = true;
      return;
    }
    const ts = join(tmp, `d${i}.ts`);
    writeFileSync(ts, prefix + text.replace(/^\uFEFF/, '') + suffix);
    sources.set(relative(here, ts), file);
    inputs.push(ts);
  });
  if (inputs.length > 0) {
    const r = spawnSync(
      process.execPath,
      [tsc, '--noEmit', '--strict', '--skipLibCheck', '--pretty', 'false', '--target', 'es2022',
        '--module', 'esnext', '--moduleResolution', 'bundler', '--types', '', ...inputs],
      { cwd: here, encoding: 'utf8' },
    );
    const out = (r.stdout + r.stderr).replace(/^(\S+?\.ts)\((\d+),(\d+)\)/gm, (m, ts, line, col) => {
      const file = sources.get(ts);
      if (!file) return m;
      const c = line === '1' ? Math.max(1, Number(col) - prefix.length) : Number(col);
      return `${file}(${line},${c})`;
    });
    if (out.trim()) process.stdout.write(out.endsWith('\n') ? out : `${out}\n`);
    if (r.status !== 0) failed = true;
    if (r.error) {
      console.error(`check: cannot run tsc: ${r.error.message}`);
      failed = true;
    }
  }
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
