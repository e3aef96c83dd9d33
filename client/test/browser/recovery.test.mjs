// Browser tests of recovery (contract §5): the built module in headless Chromium, against real
// wsnotify replicas and the real RabbitMQ. A replica stopped mid-stream (1001), a reload of the
// tab, and a tab away for longer than the recovery window.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Broker, Gateway, LoadBalancer, TestPage, freePort, launchBrowser, probeRoute, randomId, startStaticServer } from './harness.mjs';

let browser;
let web;
let broker;

before(async () => {
  [browser, web, broker] = await Promise.all([launchBrowser(), startStaticServer(), Broker.connect()]);
});

after(async () => {
  await Promise.allSettled([browser?.close(), web?.close()]);
  await broker?.close();
});

/** A fresh queue for one test, declared as a backend would; deleted (with the gateway's own queues) by the test's `after`. */
async function freshQueue(t) {
  const queue = randomId('wsnotify_client_test');
  await broker.declare(queue);
  t.after(() => broker.deleteQueues(queue));
  return queue;
}

/** A started replica on `queue`; killed by the test's `after` (registered after the queue's cleanup, so it runs first). */
async function startReplica(t, queue, env = {}) {
  const gw = new Gateway({ port: await freePort(), queue, env: { AUTH_MODE: 'insecure', ...env } });
  t.after(() => gw.kill());
  await gw.start();
  return gw;
}

async function openPage(t) {
  const tp = await TestPage.open(browser, `${web.origin}/`);
  t.after(() => tp.close());
  await tp.page.waitForFunction(() => typeof window.makeService === 'function', null, { timeout: 10000 });
  return tp;
}

const isStatus = (svc, status) => (e) => e.kind === 'status' && e.svc === svc && e.status === status;
const isMessage = (svc, label, pred = () => true) => (e) => e.kind === 'message' && e.svc === svc && e.label === label && pred(e);
const isRecovery = (svc) => (e) => e.kind === 'recovery' && e.svc === svc;
const probe = (queue, user) => (nonce) => broker.publish(queue, { user_id: user, message_type: 'probe', data: { nonce } });
/** The `data.seq` of every `m` notification the page's `'*'` handler got, in order (from event index `from`). */
const seqsOf = (tp, svc, from = 0) => tp.events.slice(from).filter(isMessage(svc, 'all', (e) => e.type === 'm')).map((e) => e.data.seq);
const range = (from, to) => Array.from({ length: to - from }, (_, i) => from + i);

test('a replica stopped mid-stream (SIGTERM, 1001): the page reconnects through the balancer with since, and its handlers see every notification once, in order', async (t) => {
  const queue = await freshQueue(t);
  // B takes the notify queue first, so stopping A does not pause ingestion: what is published
  // while the page reconnects reaches B's history, and only the replay can bring it.
  const b = await startReplica(t, queue);
  await b.waitMetric('wsnotify_ingest_active', (v) => v === 1, 'replica B taking the notify queue');
  const a = await startReplica(t, queue);
  const lb = await LoadBalancer.start([a, b]);
  t.after(() => lb.close());

  const tp = await openPage(t);
  const user = randomId('frank');
  await tp.eval(({ url, user }) => {
    window.makeService('f', { url, initialDelayMs: 200, maxReconnectAttempts: 10 });
    window.sub('f', '*', 'all');
    window.svcs.f.connect(user);
  }, { url: lb.wsUrl, user });
  await tp.waitFor(isStatus('f', 'open'), 'open');
  await a.waitMetric('wsnotify_connections', (v) => v === 1, 'the page on replica A');
  await probeRoute(tp, probe(queue, user), { svc: 'f' });

  // The stream: one notification every 5 ms, every fifth a broadcast, until told to stop.
  let published = 0;
  let stop = false;
  const publisher = (async () => {
    while (!stop && published < 20000) {
      const seq = published++;
      broker.publish(queue, seq % 5 === 4 ? { broadcast: true, message_type: 'm', data: { seq } } : { user_id: user, message_type: 'm', data: { seq } });
      await new Promise((r) => setTimeout(r, 5)); // pacing of the stream, not a wait for anything
    }
  })();
  t.after(() => {
    stop = true;
  });

  await tp.waitFor(isMessage('f', 'all', (e) => e.data?.seq === 100), 'seq 100 before the deploy', 15000);
  // The deploy: A out of the balancer, then SIGTERM. The reconnect takes 300 ms to get through.
  lb.backends = [b];
  lb.delayMs = 300;
  const exit = await a.stop();
  assert.deepEqual(exit, { code: 0, signal: null }, `replica A exit after SIGTERM\n${a.output}`);

  const recovery = await tp.waitFor(isRecovery('f'), 'the recovery event', 15000);
  const recoveryAt = tp.events.indexOf(recovery);
  const lastBefore = tp.events.slice(0, recoveryAt).filter(isMessage('f', 'all')).at(-1);
  assert.equal(recovery.recovered, true, JSON.stringify(recovery));
  assert.equal(recovery.since, lastBefore.frame.id, 'since = the last notification the handlers got');
  assert.ok(recovery.missed > 0, `notifications published during the 300 ms reconnect were missed and replayed (missed ${recovery.missed})`);
  const goingAway = tp.events.find((e) => isStatus('f', 'reconnecting')(e) && e.closeCode === 1001);
  assert.ok(goingAway, 'the page was told 1001');
  assert.equal(tp.sockets.length, 2, `sockets: ${tp.sockets}`);
  assert.equal(new URL(tp.sockets[1]).searchParams.get('since'), lastBefore.frame.id);

  // Let the stream run on live for a while, then end it.
  const seqAtRecovery = seqsOf(tp, 'f').at(-1);
  await tp.waitFor(isMessage('f', 'all', (e) => e.data?.seq >= seqAtRecovery + recovery.missed + 40), '40 live notifications after the replay', 15000);
  stop = true;
  await publisher;
  broker.publish(queue, { user_id: user, message_type: 'end', data: null });
  await tp.waitFor(isMessage('f', 'all', (e) => e.type === 'end'), 'the end marker', 15000);

  const seqs = seqsOf(tp, 'f');
  assert.equal(seqs.length, published, `${seqs.length} notifications handed over for ${published} published`);
  assert.deepEqual(seqs, range(0, published), 'every notification once, in order');
  assert.equal(await b.metric('wsnotify_recoveries_total{result="recovered"}'), 1);
  assert.equal(await b.metric('wsnotify_replayed_frames_total'), recovery.missed);
  assert.equal(tp.events.filter((e) => e.kind === 'message' && e.type.startsWith('wsnotify.')).length, 0, 'no control frame reached a handler');
  assert.deepEqual(tp.events.filter((e) => e.kind === 'error'), []);
  assert.deepEqual(tp.pageErrors, []);
});

/**
 * Reloads the page, holding the new document's module until `whileAway()` has run: the old
 * page's socket is closed first (the gateway shows no connection), so whatever `whileAway`
 * publishes can only reach the reloaded page through recovery.
 */
async function reloadAway(tp, gw, whileAway) {
  let release;
  const held = new Promise((r) => (release = r));
  const pattern = '**/dist/websocketService.js';
  await tp.page.route(pattern, async (route) => {
    await held;
    await route.continue();
  });
  try {
    await tp.page.reload({ waitUntil: 'commit' });
    await gw.waitMetric('wsnotify_connections', (v) => v === 0, "the old page's socket closed");
    await whileAway();
  } finally {
    release();
  }
  await tp.page.waitForFunction(() => typeof window.makeService === 'function', null, { timeout: 10000 });
  await tp.page.unroute(pattern);
}

test('a reload of the tab recovers from sessionStorage: the new page gets what was published while it reloaded', async (t) => {
  const queue = await freshQueue(t);
  const gw = await startReplica(t, queue);
  const tp = await openPage(t);
  const user = randomId('gina');
  const setup = () =>
    tp.eval(({ url, user }) => {
      window.makeService('g', { url });
      window.sub('g', '*', 'all');
      window.svcs.g.connect(user);
    }, { url: gw.wsUrl, user });
  await setup();
  await tp.waitFor(isStatus('g', 'open'), 'open');
  await probeRoute(tp, probe(queue, user), { svc: 'g' });
  for (let seq = 0; seq < 5; seq++) broker.publish(queue, { user_id: user, message_type: 'm', data: { seq } });
  const last = await tp.waitFor(isMessage('g', 'all', (e) => e.data?.seq === 4), 'seq 4');
  const stored = await tp.eval(() => Object.entries(sessionStorage));
  assert.equal(stored.length, 1, JSON.stringify(stored));
  assert.ok(stored[0][0].includes(user) && stored[0][0].includes(gw.wsUrl), `key ${stored[0][0]}`);
  assert.equal(stored[0][1], last.frame.id);

  const before = tp.events.length;
  await reloadAway(tp, gw, async () => {
    const entries = await gw.metric('wsnotify_history_entries');
    for (let seq = 5; seq < 10; seq++) broker.publish(queue, { user_id: user, message_type: 'm', data: { seq } });
    await gw.waitMetric('wsnotify_history_entries', (v) => v >= entries + 5, 'the gateway took seq 5..9 in');
  });
  await setup(); // the app's start-up code, as on any page load: connect(user)

  const recovery = await tp.waitFor(isRecovery('g'), 'the recovery event after the reload');
  assert.deepEqual({ recovered: recovery.recovered, missed: recovery.missed, since: recovery.since }, { recovered: true, missed: 5, since: last.frame.id });
  assert.equal(new URL(tp.sockets.at(-1)).searchParams.get('since'), last.frame.id);
  broker.publish(queue, { user_id: user, message_type: 'm', data: { seq: 10 } });
  await tp.waitFor(isMessage('g', 'all', (e) => e.data?.seq === 10), 'seq 10, live');
  assert.deepEqual(seqsOf(tp, 'g', before), range(5, 11), 'the missed ones once, in order, then live');
  assert.deepEqual(tp.events.filter((e) => e.kind === 'error'), []);
});

test('back after longer than the recovery window: the app is told recovered false (reload your state), then gets live notifications', async (t) => {
  const queue = await freshQueue(t);
  const gw = await startReplica(t, queue, { HISTORY_WINDOW_MS: '1000' });
  const tp = await openPage(t);
  const user = randomId('hank');
  const setup = () =>
    tp.eval(({ url, user }) => {
      window.makeService('h', { url });
      window.sub('h', '*', 'all');
      window.svcs.h.connect(user);
    }, { url: gw.wsUrl, user });
  await setup();
  await tp.waitFor(isStatus('h', 'open'), 'open');
  await probeRoute(tp, probe(queue, user), { svc: 'h' });
  broker.publish(queue, { user_id: user, message_type: 'm', data: { seq: 0 } });
  const last = await tp.waitFor(isMessage('h', 'all', (e) => e.data?.seq === 0), 'seq 0');

  await reloadAway(tp, gw, async () => {
    // Away for longer than the 1 s window; the next notification pushes everything older out.
    const windowEnds = Date.parse(last.frame.timestamp) + 1000 + 200;
    await new Promise((r) => setTimeout(r, Math.max(0, windowEnds - Date.now())));
    broker.publish(queue, { user_id: randomId('someone-else'), message_type: 'm', data: { seq: -1 } });
    await gw.waitMetric('wsnotify_history_entries', (v) => v === 1, 'only the newest notification left in the history');
  });
  await setup();

  const recovery = await tp.waitFor(isRecovery('h'), 'the recovery event after the reload');
  assert.deepEqual({ recovered: recovery.recovered, missed: recovery.missed, since: recovery.since }, { recovered: false, missed: 0, since: last.frame.id });
  assert.equal(await gw.metric('wsnotify_recoveries_total{result="unknown"}'), 1);
  broker.publish(queue, { user_id: user, message_type: 'm', data: { seq: 1 } });
  await tp.waitFor(isMessage('h', 'all', (e) => e.data?.seq === 1), 'seq 1, live');
  assert.equal(tp.events.filter((e) => e.kind === 'message' && e.type.startsWith('wsnotify.')).length, 0, 'the recovery frame reached no handler');
  assert.deepEqual(tp.events.filter((e) => e.kind === 'error'), []);
});
