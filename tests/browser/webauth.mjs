#!/usr/bin/env node
// A page behind `wsbridge --web-auth` (HTTP Basic), loaded in a real browser with the password,
// and its WebSocket: the browser keeps the credentials it was asked for and sends them again
// with the same origin's WebSocket handshake, which asks for the same password.
//
//   node tests/browser/webauth.mjs --user USER --password PASSWORD [--timeout SECONDS] URL
//
// URL is the protected page (an index.html served by wsbridge with --web-auth). In Debian's
// Chromium (/usr/bin/chromium, or $CHROMIUM), driven by playwright-core with `httpCredentials`
// (the browser's answer to the 401 prompt): the page must load (200, its title), then open a
// WebSocket to the same host's / with `binary`, send a message and get it back (the bridge's
// route goes to an echo server). Prints one line of JSON ({"ok":true,...} or
// {"ok":false,"error":...}); exit code 0 success, 1 failure, 2 bad usage. Bounded by --timeout
// (default 40 s).

import { existsSync } from 'node:fs';
import { brief, startRun } from './run.mjs';

const USAGE = 'usage: node webauth.mjs --user USER --password PASSWORD [--timeout SECONDS] URL';
const started = Date.now();
const opts = { url: null, user: null, password: null, timeoutMs: 40_000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--timeout' && i + 1 < argv.length) opts.timeoutMs = Number(argv[++i]) * 1000;
  else if (argv[i] === '--user' && i + 1 < argv.length) opts.user = argv[++i];
  else if (argv[i] === '--password' && i + 1 < argv.length) opts.password = argv[++i];
  else if (opts.url === null && /^http:\/\//.test(argv[i])) opts.url = argv[i];
  else {
    console.error(`webauth.mjs: unexpected argument ${argv[i]}\n${USAGE}`);
    process.exit(2);
  }
}
if (opts.url === null || opts.user === null || opts.password === null || !(opts.timeoutMs > 0 && opts.timeoutMs <= 55_000)) {
  console.error(USAGE);
  process.exit(2);
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const run = startRun('webauth.mjs', opts, started);

// In the page: open a WebSocket, send `text`, and tell what came back (or how it ended), within `ms`.
function echo([wsUrl, text, ms]) {
  return new Promise((resolve) => {
    const ws = new WebSocket(wsUrl, ['binary']);
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => ws.send(new TextEncoder().encode(text));
    ws.onmessage = (e) => {
      resolve({ opened: true, echoed: new TextDecoder().decode(e.data) });
      ws.close(1000);
    };
    ws.onclose = (e) => resolve({ opened: false, code: e.code });
    setTimeout(() => resolve({ timedOut: true }), ms);
  });
}

async function main() {
  if (!existsSync(executablePath)) return run.fail(`${executablePath} not found`);
  const { chromium } = await import('playwright-core');
  const page = await run.launch(chromium, executablePath, { httpCredentials: { username: opts.user, password: opts.password }, timeout: 15_000 });
  if (!page) return;
  page.setDefaultTimeout(15_000);
  const response = await page.goto(opts.url, { waitUntil: 'load' });
  const status = response ? response.status() : null;
  if (status !== 200) return run.fail(`the page answered ${status}, not 200, with the password`);
  const title = await page.title();
  const wsUrl = new URL('/', opts.url).href.replace(/^http/, 'ws');
  const got = await page.evaluate(echo, [wsUrl, 'through the password', 10_000]);
  if (got.echoed !== 'through the password') {
    return run.fail(`the page's WebSocket to ${wsUrl} did not echo: ${JSON.stringify(got)}`);
  }
  await run.finish();
  run.result({ ok: true, url: opts.url, status, title, ws: wsUrl, echoed: got.echoed });
}

main().catch((e) => run.fail(`unexpected error: ${brief(e, 3)}`));
