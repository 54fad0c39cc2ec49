#!/usr/bin/env node
// End-to-end check of noVNC through wsbridge in a real browser, against a real VNC server.
//
//   node tests/browser/novnc.mjs --geometry WxH --desktop NAME [--timeout SECONDS] URL
//
// URL is noVNC's full page (vnc.html, with autoconnect=true and the path to connect to) as
// wsbridge serves it with --web. Launches Debian's Chromium (/usr/bin/chromium, or $CHROMIUM)
// headless through playwright-core, opens URL and checks, each step bounded:
//   1. noVNC connects: the page's status says `Connected (unencrypted) to NAME` (NAME is the VNC
//      server's desktop name, which only its ServerInit message carries);
//   2. the framebuffer arrives, all of it: noVNC's canvas is WxH and shows the X root window's
//      black and white stipple over every pixel (opaque black or white only, one 4x4 tile
//      repeated: a blank, grey or partly drawn canvas fails);
//   3. input reaches the server and its answer comes back: the page's "Scaling mode" setting is
//      switched to "Remote resizing", so noVNC sends SetDesktopSize for its screen's size; the
//      server resizes its desktop and sends the new framebuffer, so the canvas takes the screen's
//      size (not WxH) and the stipple covers it whole again, the newly exposed area included;
//   4. noVNC disconnects cleanly: its Disconnect button (rfb.disconnect()), then the status says
//      `Disconnected` (not "Something went wrong") and the WebSocket is closed.
// The page must log no console errors and throw no uncaught exceptions. The report counts the
// WebSocket's frames and payload bytes each way, as the browser saw them, for the caller to hold
// against the bridge's own count.
//
// Prints one line of JSON on stdout ({"ok":true,...} or {"ok":false,"error":...}); on failure
// also a `novnc.mjs: FAIL: ...` line on stderr. Exit code: 0 success, 1 failure, 2 bad usage.
// If $WSBRIDGE_SCREENSHOT is set, a PNG of the page is saved there once the desktop is resized
// (on failure too, if the page got that far). The whole run ends within --timeout (default 50 s).

import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { brief, startRun } from './run.mjs';

const USAGE = 'usage: node novnc.mjs --geometry WxH --desktop NAME [--timeout SECONDS] URL';
const started = Date.now();

function parseArgs(argv) {
  const opts = { url: null, geometry: null, desktop: null, timeoutMs: 50_000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--geometry') {
      const m = /^(\d+)x(\d+)$/.exec(value());
      if (!m) throw new Error('--geometry must be WIDTHxHEIGHT');
      opts.geometry = { w: Number(m[1]), h: Number(m[2]) };
    } else if (a === '--desktop') opts.desktop = value();
    else if (a === '--timeout') opts.timeoutMs = Number(value()) * 1000;
    else if (a === '-h' || a === '--help') {
      console.log(USAGE);
      process.exit(0);
    } else if (a.startsWith('-')) throw new Error(`unknown option ${a}`);
    else if (opts.url === null) opts.url = a;
    else throw new Error(`unexpected argument ${a}`);
  }
  if (opts.url === null) throw new Error('missing URL');
  if (!/^https?:\/\//.test(opts.url)) throw new Error(`URL must start with http:// or https://, got ${opts.url}`);
  if (opts.geometry === null) throw new Error('missing --geometry');
  if (!opts.desktop) throw new Error('missing --desktop');
  if (!(opts.timeoutMs > 0 && opts.timeoutMs <= 55_000)) throw new Error('--timeout must be between 0 and 55 seconds');
  return opts;
}

let opts;
try {
  opts = parseArgs(process.argv.slice(2));
} catch (e) {
  console.error(`novnc.mjs: ${e.message}\n${USAGE}`);
  process.exit(2);
}

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const screenshot = process.env.WSBRIDGE_SCREENSHOT ? resolve(process.env.WSBRIDGE_SCREENSHOT) : null;
const stepMs = Math.min(15_000, opts.timeoutMs);
const deadline = started + opts.timeoutMs;
// Each wait gets at most stepMs, and never more than is left of the whole run.
const left = () => Math.max(1, Math.min(stepMs, deadline - Date.now()));
// The browser's window: noVNC's screen fills it, so a remote resize asks for about this size,
// which must differ from the server's geometry for step 3 to show anything.
const VIEWPORT = { width: 1000, height: 720 };

const run = startRun('novnc.mjs', opts, started);
const { result, fail } = run;

// Runs in the page: the state of noVNC's canvas, if it is `size` ({w, h}; null: its screen's
// size, which is what noVNC asks the server for on a remote resize) and shows the whole X root
// stipple: every pixel opaque black or white, and the canvas one 4x4 tile repeated (the X
// server's root weave), so that no part of it is left undrawn (transparent, or black where the
// tile has white). Returns false until then; with `diagnose`, what the canvas shows at whatever
// size it has.
function stipple({ size, diagnose }) {
  const canvas = document.querySelector('#noVNC_container canvas');
  if (!canvas || !canvas.parentElement) return diagnose ? { canvas: null } : false;
  let w = size && size.w;
  let h = size && size.h;
  if (!size) {
    const r = canvas.parentElement.getBoundingClientRect();
    w = Math.floor(r.width);
    h = Math.floor(r.height);
  }
  const found = `${canvas.width}x${canvas.height}`;
  if (diagnose) {
    // What the canvas shows at its own size.
    w = canvas.width;
    h = canvas.height;
  } else if (canvas.width !== w || canvas.height !== h) return false;
  const px = new Uint32Array(canvas.getContext('2d').getImageData(0, 0, w, h).data.buffer);
  // RGBA bytes read as one little-endian number: opaque black, opaque white.
  const BLACK = 0xff000000;
  const WHITE = 0xffffffff;
  let black = 0;
  let white = 0;
  let other = 0;
  let offTile = 0;
  let box = null;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      const p = px[i];
      if (p === BLACK) black++;
      else if (p === WHITE) white++;
      else other++;
      if ((x >= 4 && p !== px[i - 4]) || (y >= 4 && p !== px[i - 4 * w])) {
        offTile++;
        box = box ? [Math.min(box[0], x), Math.min(box[1], y), Math.max(box[2], x), Math.max(box[3], y)] : [x, y, x, y];
      }
    }
  }
  const state = { size: found, black, white, other, offTile };
  // Where the pixels off the tile are, for a failure message: [left, top, right, bottom].
  if (box) state.offTileBox = box;
  if (diagnose) return state;
  return black > 0 && white > 0 && other === 0 && offTile === 0 ? state : false;
}

async function main() {
  if (!existsSync(executablePath)) {
    return fail(`${executablePath} not found: install Debian's chromium (scripts/test.sh does it), or set CHROMIUM`);
  }
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (e) {
    return fail(`cannot load playwright-core (${e.message}): run \`npm ci\` in tests/browser (scripts/test.sh does it)`);
  }

  const page = await run.launch(chromium, executablePath, { fail, timeout: left(), viewport: VIEWPORT });
  if (!page) return;
  const context = run.context;
  page.setDefaultTimeout(stepMs);

  const problems = [];
  const ignored = [];
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const loc = msg.location();
    const where = loc && loc.url ? loc.url : '';
    const line = `console error: ${msg.text()}${where ? ` (${where})` : ''}`;
    // noVNC's UI fetches ./package.json to show its version, and Debian's novnc package does not
    // ship that file: the 404 and noVNC's own error about it (it then hides the version, nothing
    // else) are the package's, not a fault of the bridge. They are reported, under "ignored".
    const packageJson =
      (/^https?:\/\/[^/]+\/package\.json$/.test(where) && / 404 /.test(msg.text())) ||
      /^Couldn't fetch package\.json: Error: 404 /.test(msg.text());
    if (packageJson) ignored.push(line);
    else problems.push(line);
  });
  page.on('pageerror', (err) => problems.push(`uncaught exception: ${err.message}`));
  page.on('crash', () => problems.push('the page crashed'));

  // noVNC's WebSocket, as the browser sees it: what came in, and when it closed.
  const socket = { url: null, framesIn: 0, bytesIn: 0, framesOut: 0, bytesOut: 0 };
  let socketClosed;
  const closed = new Promise((r) => (socketClosed = r));
  const length = (payload) => (typeof payload === 'string' ? Buffer.byteLength(payload) : payload.length);
  page.on('websocket', (ws) => {
    if (socket.url !== null) return problems.push(`a second WebSocket was opened: ${ws.url()}`);
    socket.url = ws.url();
    ws.on('framereceived', (f) => {
      socket.framesIn++;
      socket.bytesIn += length(f.payload);
    });
    ws.on('framesent', (f) => {
      socket.framesOut++;
      socket.bytesOut += length(f.payload);
    });
    ws.on('socketerror', (e) => problems.push(`WebSocket error: ${e}`));
    ws.on('close', () => socketClosed(Date.now()));
  });

  // What the page shows, for failure messages.
  const snapshot = async () => {
    try {
      const s = await page.evaluate(() => ({
        status: document.getElementById('noVNC_status')?.textContent ?? null,
        classes: document.documentElement.className,
      }));
      const canvas = await page.evaluate(stipple, { size: null, diagnose: true });
      return ` [status: ${JSON.stringify(s.status)}; html classes: ${JSON.stringify(s.classes)}; canvas: ${JSON.stringify(canvas)}; websocket: ${JSON.stringify(socket)}${problems.length ? `; ${problems.join('; ')}` : ''}]`;
    } catch {
      return problems.length ? ` [${problems.join('; ')}]` : '';
    }
  };
  const shoot = async () => {
    if (!screenshot) return null;
    await page.screenshot({ path: screenshot, timeout: left() });
    return screenshot;
  };
  const failWithPage = async (message) => {
    const extra = await snapshot();
    await shoot().catch(() => {});
    return fail(message + extra);
  };
  const status = () => page.evaluate(() => document.getElementById('noVNC_status')?.textContent ?? '');

  const response = await page.goto(opts.url, { waitUntil: 'load', timeout: left() }).catch((e) => e);
  if (response instanceof Error) return failWithPage(`cannot open ${opts.url}: ${brief(response)}`);
  if (!response || !response.ok()) return failWithPage(`${opts.url} answered HTTP ${response ? response.status() : '(no response)'}`);

  // 1. Connected: noVNC's UI marks the page `noVNC_connected` on the RFB "connect" event, after
  // the handshake and ServerInit. A failure shows as a status of the error kind instead.
  try {
    await page.waitForFunction(
      () =>
        document.documentElement.classList.contains('noVNC_connected') ||
        document.getElementById('noVNC_status')?.classList.contains('noVNC_status_error'),
      null,
      { timeout: left() },
    );
  } catch (e) {
    return failWithPage(`noVNC did not connect in time (${brief(e)})`);
  }
  const connected = await status();
  const wantStatus = `Connected (unencrypted) to ${opts.desktop}`;
  if (connected !== wantStatus) return failWithPage(`the status is ${JSON.stringify(connected)}, not ${JSON.stringify(wantStatus)}`);

  // 2. The server's framebuffer, all of it, at the server's geometry.
  let first;
  try {
    first = await (await page.waitForFunction(stipple, { size: opts.geometry, diagnose: false }, { timeout: left() })).jsonValue();
  } catch (e) {
    return failWithPage(`the canvas never showed the ${opts.geometry.w}x${opts.geometry.h} black and white stipple (${brief(e)})`);
  }

  // 3. Remote resizing, through the page's own setting (its change handler sets
  // rfb.resizeSession, and noVNC sends SetDesktopSize).
  const framesBefore = socket.framesIn;
  await page.evaluate(() => {
    const select = document.getElementById('noVNC_setting_resize');
    select.value = 'remote';
    select.dispatchEvent(new Event('change'));
  });
  let resized;
  try {
    resized = await (await page.waitForFunction(stipple, { size: null, diagnose: false }, { timeout: left() })).jsonValue();
  } catch (e) {
    return failWithPage(`after "Remote resizing" the canvas never took the screen's size with the stipple over it (${brief(e)})`);
  }
  if (resized.size === first.size) return failWithPage(`the screen is ${resized.size}, the server's size already: nothing to resize`);
  const framesForResize = socket.framesIn - framesBefore;

  let shot;
  try {
    shot = await shoot();
  } catch (e) {
    return fail(`cannot save the screenshot to ${screenshot}: ${brief(e)}`);
  }

  // 4. Disconnect as a user does: the Disconnect button (it calls rfb.disconnect()). The control
  // bar that holds it may be folded away: click it from the page.
  await page.evaluate(() => document.getElementById('noVNC_disconnect_button').click());
  let ended;
  try {
    const handle = await page.waitForFunction(
      () => {
        const t = document.getElementById('noVNC_status')?.textContent ?? '';
        return !document.documentElement.classList.contains('noVNC_connected') &&
          !document.documentElement.classList.contains('noVNC_disconnecting') &&
          t !== '' &&
          !t.startsWith('Connected')
          ? t
          : false;
      },
      null,
      { timeout: left() },
    );
    ended = await handle.jsonValue();
  } catch (e) {
    return failWithPage(`noVNC did not finish disconnecting in time (${brief(e)})`);
  }
  if (ended !== 'Disconnected') return failWithPage(`after Disconnect the status is ${JSON.stringify(ended)}, not "Disconnected"`);
  const closedAt = await Promise.race([closed, new Promise((r) => setTimeout(() => r(null), left()).unref())]);
  if (closedAt === null) return failWithPage('the browser never saw the WebSocket close');

  if (problems.length) return failWithPage(`the page reported ${problems.length} problem(s)`);

  const browserVersion = context.browser()?.version() ?? null;
  await run.finish();
  result({
    ok: true,
    url: opts.url,
    browser: browserVersion,
    websocket: socket.url,
    status: connected,
    framebuffer: first,
    resized,
    framesForResize,
    framesIn: socket.framesIn,
    bytesIn: socket.bytesIn,
    framesOut: socket.framesOut,
    bytesOut: socket.bytesOut,
    disconnected: ended,
    screenshot: shot,
    ignored,
  });
  process.exit(0);
}

main().catch((e) => fail(`unexpected error: ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}`));
