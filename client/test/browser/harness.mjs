// Test harness for the browser tests: a static file server, the real wsnotify gateway, the real
// RabbitMQ (amqplib) and headless Chromium (playwright-core driving Debian's /usr/bin/chromium).
//
// Every wait here is event-driven and bounded: it resolves on the awaited event and fails with a
// descriptive error (including the gateway's output) when the deadline passes.
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { EventEmitter, once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { connect as netConnect, createServer as createNetServer } from 'node:net';
import { dirname, extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import amqplib from 'amqplib';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const CLIENT_DIR = resolve(here, '..', '..');
export const REPO_DIR = resolve(CLIENT_DIR, '..');
export const GATEWAY_BIN = process.env.WSNOTIFY_BIN || join(REPO_DIR, 'target', 'debug', 'wsnotify');
export const AMQP_URL = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

/** Rejects after `ms` with `what` in the message unless `promise` settles first. */
export async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export const randomId = (prefix) => `${prefix}_${randomBytes(6).toString('hex')}`;

/** A TCP port that was free a moment ago (the OS picks it). */
export async function freePort() {
  const srv = createNetServer();
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const { port } = srv.address();
  srv.close();
  await once(srv, 'close');
  return port;
}

// --- static files --------------------------------------------------------------------------------

const MIME = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8', '.css': 'text/css', '.map': 'application/json', '.ts': 'text/plain; charset=utf-8' };
const SERVED = ['dist', 'example', join('test', 'browser', 'fixtures'), join('test', 'browser', 'build')];

/** Serves client/dist, client/example, the test pages (index.html at /) and bundles built for them (test/browser/build) on 127.0.0.1, ephemeral port. */
export async function startStaticServer() {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    const rel = path === '/' ? join('test', 'browser', 'fixtures', 'index.html') : normalize(path.slice(1));
    const file = resolve(CLIENT_DIR, rel);
    const allowed = SERVED.some((d) => file.startsWith(resolve(CLIENT_DIR, d) + sep));
    if (!allowed || !existsSync(file)) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
      return;
    }
    res.writeHead(200, { 'content-type': MIME[extname(file)] || 'application/octet-stream', 'cache-control': 'no-store' });
    res.end(readFileSync(file));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  return {
    origin: `http://127.0.0.1:${port}`,
    close: () => new Promise((r) => server.close(() => r())),
  };
}

// --- the gateway ---------------------------------------------------------------------------------

/** The real wsnotify binary, configured by environment variables. */
export class Gateway {
  constructor({ port, queue, env = {} }) {
    this.port = port;
    this.queue = queue;
    this.env = env;
    this.proc = null;
    this.output = '';
    this.runs = 0;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get httpUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts the gateway and resolves once GET /readyz answers 200 (bounded). */
  async start({ readyTimeoutMs = 20000 } = {}) {
    if (!existsSync(GATEWAY_BIN)) throw new Error(`gateway binary not found at ${GATEWAY_BIN} (build it with cargo build, or set WSNOTIFY_BIN)`);
    this.runs++;
    this.output += `\n----- start #${this.runs} -----\n`;
    const proc = spawn(GATEWAY_BIN, [], {
      env: {
        PATH: process.env.PATH,
        RUST_LOG: process.env.RUST_LOG || 'info',
        SERVER_HOST: '127.0.0.1',
        SERVER_PORT: String(this.port),
        AMQP_URL,
        NOTIFY_QUEUE: this.queue,
        ...this.env,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    proc.exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
    const append = (chunk) => {
      this.output += chunk.toString();
      if (this.output.length > 200_000) this.output = this.output.slice(-100_000);
    };
    proc.stdout.on('data', append);
    proc.stderr.on('data', append);
    await withTimeout(this.#pollReady(proc), readyTimeoutMs, `gateway readiness (GET ${this.httpUrl}/readyz)`).catch((e) => {
      e.message += `\ngateway output:${this.output}`;
      throw e;
    });
  }

  async #pollReady(proc) {
    let exited = null;
    proc.exited.then((r) => (exited = r));
    for (;;) {
      if (exited) throw new Error(`gateway exited before it was ready (code ${exited.code}, signal ${exited.signal})`);
      try {
        const res = await fetch(`${this.httpUrl}/readyz`, { signal: AbortSignal.timeout(1000) });
        await res.arrayBuffer();
        if (res.status === 200) return;
      } catch {
        /* not listening yet */
      }
      // Polling interval of the readiness probe (the gateway offers no readiness event to wait on).
      await Promise.race([new Promise((r) => setTimeout(r, 50)), proc.exited]);
    }
  }

  /** Sends SIGTERM and resolves with the exit status (bounded; SIGKILL after the deadline). */
  async stop({ timeoutMs = 15000 } = {}) {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return proc ? proc.exited : { code: null, signal: null };
    proc.kill('SIGTERM');
    try {
      return await withTimeout(proc.exited, timeoutMs, 'gateway exit after SIGTERM');
    } catch (e) {
      proc.kill('SIGKILL');
      await proc.exited;
      e.message += `\ngateway output:${this.output}`;
      throw e;
    }
  }

  /** The value of one sample on GET /metrics, e.g. `wsnotify_connections` or `wsnotify_recoveries_total{result="recovered"}`. */
  async metric(sample) {
    const res = await fetch(`${this.httpUrl}/metrics`, { signal: AbortSignal.timeout(2000) });
    const text = await res.text();
    const line = text.split('\n').find((l) => l.startsWith(`${sample} `));
    if (!line) throw new Error(`no sample ${sample} on ${this.httpUrl}/metrics`);
    return Number(line.slice(sample.length + 1));
  }

  /** Polls GET /metrics until `pred(value of sample)` holds (bounded). */
  async waitMetric(sample, pred, what, timeoutMs = 10000) {
    let last;
    const poll = async () => {
      for (;;) {
        last = await this.metric(sample).catch((e) => e.message);
        if (typeof last === 'number' && pred(last)) return last;
        // Polling interval: /metrics is the only view of the gateway's internals.
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    return withTimeout(poll(), timeoutMs, `${what} (${sample}, last ${last})`);
  }

  /** For cleanup: stop, ignoring errors. */
  async kill() {
    try {
      await this.stop({ timeoutMs: 5000 });
    } catch {
      /* killed */
    }
  }
}

// --- a load balancer ----------------------------------------------------------------------------

/**
 * A TCP load balancer on 127.0.0.1 in front of gateway replicas, standing in for Traefik: each
 * new connection goes to the first replica in `backends` that accepts it, and bytes are relayed
 * both ways until either side closes. A deploy takes a replica out of `backends` before stopping
 * it. `delayMs` holds each new connection that long before it is relayed (the latency of a real
 * reconnect: DNS, TLS, a busy balancer).
 */
export class LoadBalancer {
  static async start(backends) {
    const lb = new LoadBalancer();
    lb.backends = [...backends];
    lb.delayMs = 0;
    lb.sockets = new Set();
    lb.server = createNetServer((client) => lb.#relay(client));
    lb.server.listen(0, '127.0.0.1');
    await once(lb.server, 'listening');
    lb.port = lb.server.address().port;
    return lb;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async #relay(client) {
    this.sockets.add(client);
    client.once('close', () => this.sockets.delete(client));
    client.on('error', () => client.destroy());
    client.pause();
    if (this.delayMs > 0) await new Promise((r) => setTimeout(r, this.delayMs));
    for (const gw of [...this.backends]) {
      if (client.destroyed) return;
      const up = netConnect(gw.port, '127.0.0.1');
      const connected = await new Promise((resolve) => {
        up.once('connect', () => resolve(true));
        up.once('error', () => resolve(false));
      });
      if (!connected) continue; // refused: the next replica
      this.sockets.add(up);
      up.once('close', () => this.sockets.delete(up));
      // Either side's error tears both down; an orderly end is passed on by pipe().
      up.on('error', () => client.destroy());
      client.on('error', () => up.destroy());
      up.once('close', () => client.end());
      client.once('close', () => up.destroy());
      client.pipe(up);
      up.pipe(client);
      client.resume();
      return;
    }
    client.destroy(); // no replica: as a balancer with no healthy backend
  }

  async close() {
    for (const s of this.sockets) s.destroy();
    await new Promise((r) => this.server.close(() => r()));
  }
}

// --- the broker ----------------------------------------------------------------------------------

export class Broker {
  static async connect() {
    const b = new Broker();
    b.conn = await withTimeout(amqplib.connect(AMQP_URL), 10000, `RabbitMQ at ${AMQP_URL}`);
    b.ch = await b.conn.createChannel();
    return b;
  }

  /** Declares the queue the way backends do: durable, no arguments. */
  async declare(queue) {
    await this.ch.assertQueue(queue, { durable: true });
  }

  /** Publishes one task envelope to the default exchange, routing key = queue. */
  publish(queue, payload) {
    const body = Buffer.from(JSON.stringify({ type: 'websocket_notification', payload }));
    this.ch.sendToQueue(queue, body, { contentType: 'application/json', persistent: true });
  }

  /** Deletes the queue, its dead-letter queue and the gateway's fan-out log (a stream). */
  async deleteQueues(queue) {
    for (const q of [queue, `${queue}.dead`, `${queue}.log`]) {
      try {
        await this.ch.deleteQueue(q);
      } catch {
        // a failed operation closes the channel; open a new one for the next
        this.ch = await this.conn.createChannel();
      }
    }
  }

  async close() {
    try {
      await this.conn.close();
    } catch {
      /* already closed */
    }
  }
}

// --- JWT (HS256) ---------------------------------------------------------------------------------

export function signJwt(claims, secret) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const input = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  const sig = createHmac('sha256', secret).update(input).digest('base64url');
  return `${input}.${sig}`;
}

export function jwtClaims(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
}

// --- the browser ---------------------------------------------------------------------------------

export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: apt-get install -y chromium (or set CHROMIUM_PATH)`);
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
    timeout: 30000,
  });
}

/**
 * A page with the built module loaded (see fixtures/index.html). Everything the page reports
 * through `window.__report(event)` lands in `events`, and `waitFor` waits for a matching event.
 */
export class TestPage {
  static async open(browser, url, { exposeBeforeLoad = {} } = {}) {
    const tp = new TestPage();
    tp.context = await browser.newContext();
    tp.page = await tp.context.newPage();
    tp.page.setDefaultTimeout(15000);
    tp.events = [];
    tp.console = [];
    tp.pageErrors = [];
    tp.sockets = [];
    tp.emitter = new EventEmitter();
    tp.page.on('console', (msg) => {
      tp.console.push(msg);
      tp.emitter.emit('console', msg);
    });
    tp.page.on('pageerror', (err) => tp.pageErrors.push(err));
    tp.page.on('websocket', (ws) => tp.sockets.push(ws.url()));
    await tp.page.exposeFunction('__report', (ev) => {
      tp.events.push(ev);
      tp.emitter.emit('event', ev);
    });
    for (const [name, fn] of Object.entries(exposeBeforeLoad)) await tp.page.exposeFunction(name, fn);
    await tp.page.goto(url);
    return tp;
  }

  /** Waits for the first event (already recorded or future) matching `pred`. */
  waitFor(pred, what, timeoutMs = 10000) {
    const found = this.events.find(pred);
    if (found) return Promise.resolve(found);
    return this.#waitOn('event', pred, what, timeoutMs, () => JSON.stringify(this.events.slice(-15), null, 1));
  }

  /** Waits for a future event matching `pred` (ignores those already recorded). */
  waitForNext(pred, what, timeoutMs = 10000) {
    return this.#waitOn('event', pred, what, timeoutMs, () => JSON.stringify(this.events.slice(-15), null, 1));
  }

  /** Waits for a console message (already logged or future) matching `pred`. */
  waitForConsole(pred, what, timeoutMs = 10000) {
    const found = this.console.find(pred);
    if (found) return Promise.resolve(found);
    return this.#waitOn('console', pred, what, timeoutMs, () => this.console.map((m) => m.text()).slice(-15).join('\n'));
  }

  #waitOn(name, pred, what, timeoutMs, dump) {
    let listener;
    const p = new Promise((resolve) => {
      listener = (ev) => {
        if (pred(ev)) resolve(ev);
      };
      this.emitter.on(name, listener);
    });
    return withTimeout(p, timeoutMs, what)
      .catch((e) => {
        e.message += `\nrecent ${name}s:\n${dump()}`;
        throw e;
      })
      .finally(() => this.emitter.off(name, listener));
  }

  eval(fn, arg) {
    return this.page.evaluate(fn, arg);
  }

  async close() {
    await this.context.close().catch(() => {});
  }
}

/**
 * Makes sure the gateway routes messages to a connection the page has just opened: publishes a
 * `probe` message (via `publishProbe(nonce)`) and waits up to `stepMs` for the page to report it,
 * repeating with a new nonce until one arrives (bounded by `timeoutMs`). Needed because the
 * browser's `open` event may precede the gateway's registration of the connection by a moment.
 * The page must report probe frames as events `{ kind: 'message', type: 'probe', data: { nonce } }`.
 */
export async function probeRoute(tp, publishProbe, { svc, timeoutMs = 10000, stepMs = 500 } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (let i = 0; Date.now() < deadline; i++) {
    const nonce = randomId('probe');
    const arrived = tp.waitFor((e) => e.kind === 'message' && e.type === 'probe' && e.data?.nonce === nonce && (!svc || e.svc === svc), `probe ${nonce}`, stepMs);
    publishProbe(nonce);
    try {
      await arrived;
      return i + 1;
    } catch {
      /* not routed yet: try again */
    }
  }
  throw new Error(`no probe message reached the page within ${timeoutMs} ms (svc ${svc})`);
}
