// Browser tests, insecure mode (?user_id=): the built module in headless Chromium, against the real
// wsnotify gateway and the real RabbitMQ.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Broker, Gateway, TestPage, freePort, launchBrowser, probeRoute, randomId, startStaticServer } from './harness.mjs';

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

/** A fresh queue and gateway for one test; cleaned up by the test's `after`. */
async function startGateway(t, env = {}) {
  const queue = randomId('wsnotify_client_test');
  const gw = new Gateway({ port: await freePort(), queue, env: { AUTH_MODE: 'insecure', ...env } });
  t.after(async () => {
    await gw.kill();
    await broker.deleteQueues(queue);
  });
  await broker.declare(queue); // as a backend would: durable, no arguments
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

test("user message and broadcast reach the subscribed handlers; the seed's snippet works unchanged", async (t) => {
  const gw = await startGateway(t);
  const tp = await openPage(t);
  const alice = randomId('alice');
  const bob = randomId('bob');

  // The shared default export, configured once with the gateway URL, then the seed's snippet verbatim.
  await tp.eval(({ url }) => window.makeService('default', { url }), { url: gw.wsUrl });
  await tp.eval(({ userId }) => {
    const webSocketService = window.webSocketService;
    // ---- seed: "Frontend Integration" ----
    // Connect with user ID
    webSocketService.connect(userId);

    // Subscribe to message types
    webSocketService.subscribe('welcome', (data) => {
      console.log('Welcome message:', data);
    });

    webSocketService.subscribe('balance_update', (data) => {
      console.log('Balance updated:', data);
    });
    // ---- end of seed snippet ----
  }, { userId: alice });
  await tp.eval(() => window.sub('default', '*', 'alice*'));
  // A second independent instance (another user) and a second connection of alice (another tab).
  await tp.eval(({ url, bob, alice }) => {
    window.makeService('bob', { url });
    window.sub('bob', '*', 'bob*');
    window.svcs.bob.connect(bob);
    window.makeService('alice2', { url });
    window.sub('alice2', '*', 'alice2*');
    window.svcs.alice2.connect(alice);
  }, { url: gw.wsUrl, bob, alice });

  await Promise.all(['default', 'bob', 'alice2'].map((s) => tp.waitFor(isStatus(s, 'open'), `${s} open`)));
  assert.ok(tp.sockets.every((u) => u.startsWith(gw.wsUrl + '?user_id=')), `socket URLs: ${tp.sockets}`);
  for (const [svc, user] of [['default', alice], ['alice2', alice], ['bob', bob]]) {
    await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc });
  }

  // user-targeted messages, through the seed's handlers (console.log)
  broker.publish(gw.queue, { user_id: alice, message_type: 'welcome', data: { message: 'Welcome!' } });
  broker.publish(gw.queue, { user_id: alice, message_type: 'balance_update', data: { balance: 42.5, currency: 'EUR' } });
  const welcome = await tp.waitForConsole((m) => m.text().startsWith('Welcome message:'), 'seed welcome handler');
  assert.deepEqual(await welcome.args()[1].jsonValue(), { message: 'Welcome!' });
  const balance = await tp.waitForConsole((m) => m.text().startsWith('Balance updated:'), 'seed balance_update handler');
  assert.deepEqual(await balance.args()[1].jsonValue(), { balance: 42.5, currency: 'EUR' });

  // the whole frame, as seen by a '*' handler
  const wf = (await tp.waitFor(isMessage('default', 'alice*', (e) => e.type === 'welcome'), 'welcome frame on alice*')).frame;
  assert.equal(typeof wf.id, 'string');
  assert.ok(wf.id.length > 0);
  assert.equal(wf.user_id, alice);
  assert.ok(!Number.isNaN(Date.parse(wf.timestamp)) && /Z$|[+-]00:00$/.test(wf.timestamp), `timestamp ${wf.timestamp}`);
  assert.deepEqual(wf.data, { message: 'Welcome!' });
  // alice's other tab got the same message, with the same id
  const wf2 = (await tp.waitFor(isMessage('alice2', 'alice2*', (e) => e.type === 'welcome'), 'welcome frame on alice2*')).frame;
  assert.equal(wf2.id, wf.id);

  // a broadcast reaches everybody, without user_id
  broker.publish(gw.queue, { broadcast: true, message_type: 'notification', data: { title: 'Maintenance at 22:00' } });
  const [ba, bb] = await Promise.all([
    tp.waitFor(isMessage('default', 'alice*', (e) => e.type === 'notification'), 'broadcast on alice'),
    tp.waitFor(isMessage('bob', 'bob*', (e) => e.type === 'notification'), 'broadcast on bob'),
  ]);
  assert.equal(ba.frame.id, bb.frame.id);
  assert.equal('user_id' in bb.frame, false, 'broadcast frames carry no user_id');
  assert.deepEqual(bb.data, { title: 'Maintenance at 22:00' });
  // bob's socket delivers in order, so by now it would have shown alice's messages had they been misrouted
  assert.deepEqual(
    tp.events.filter((e) => e.kind === 'message' && e.svc === 'bob' && e.type !== 'probe').map((e) => e.type),
    ['notification'],
  );

  // user_ids: several targets in one message
  broker.publish(gw.queue, { user_ids: [alice, bob], message_type: 'notification', data: { title: 'both' } });
  await Promise.all([
    tp.waitFor(isMessage('default', 'alice*', (e) => e.data?.title === 'both'), 'user_ids message on alice'),
    tp.waitFor(isMessage('bob', 'bob*', (e) => e.data?.title === 'both'), 'user_ids message on bob'),
  ]);
  assert.deepEqual(tp.pageErrors, []);
  assert.equal(tp.events.filter((e) => e.kind === 'error').length, 0, JSON.stringify(tp.events.filter((e) => e.kind === 'error')));
});

test('unsubscribe stops delivery to that handler only', async (t) => {
  const gw = await startGateway(t);
  const tp = await openPage(t);
  const user = randomId('carol');
  await tp.eval(({ url, user }) => {
    window.makeService('c', { url });
    window.sub('c', 'notice', 'A');
    window.sub('c', 'notice', 'B');
    window.sub('c', '*', 'all');
    window.svcs.c.connect(user);
  }, { url: gw.wsUrl, user });
  await tp.waitFor(isStatus('c', 'open'), 'open');
  await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc: 'c' });

  broker.publish(gw.queue, { user_id: user, message_type: 'notice', data: { n: 1 } });
  await Promise.all(['A', 'B', 'all'].map((l) => tp.waitFor(isMessage('c', l, (e) => e.data?.n === 1), `notice 1 on ${l}`)));

  await tp.eval(() => window.unsubs.A());
  broker.publish(gw.queue, { user_id: user, message_type: 'notice', data: { n: 2 } });
  // Handlers run in subscription order (A, B, then '*'), so once '*' has it, A would have had it too.
  await tp.waitFor(isMessage('c', 'all', (e) => e.data?.n === 2), 'notice 2 on *');
  await tp.waitFor(isMessage('c', 'B', (e) => e.data?.n === 2), 'notice 2 on B');
  assert.deepEqual(tp.events.filter(isMessage('c', 'A')).map((e) => e.data.n), [1]);

  // unsubscribing the last handler of a type: frames of that type still reach '*'
  await tp.eval(() => window.unsubs.B());
  broker.publish(gw.queue, { user_id: user, message_type: 'notice', data: { n: 3 } });
  await tp.waitFor(isMessage('c', 'all', (e) => e.data?.n === 3), 'notice 3 on *');
  assert.deepEqual(tp.events.filter(isMessage('c', 'B')).map((e) => e.data.n), [1, 2]);
});

test('gateway stop (SIGTERM, close 1001) and restart on the same port: the page reconnects with backoff and receives again', async (t) => {
  const gw = await startGateway(t);
  const tp = await openPage(t);
  const user = randomId('dave');
  const opts = { url: gw.wsUrl, initialDelayMs: 200, backoffFactor: 2, maxDelayMs: 5000, jitter: 0.2, maxReconnectAttempts: 10 };
  await tp.eval(({ opts, user }) => {
    window.makeService('d', opts);
    window.sub('d', 'update', 'u');
    window.svcs.d.connect(user);
  }, { opts, user });
  await tp.waitFor(isStatus('d', 'open'), 'first open');
  await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc: 'd' });
  broker.publish(gw.queue, { user_id: user, message_type: 'update', data: { seq: 1 } });
  await tp.waitFor(isMessage('d', 'u', (e) => e.data?.seq === 1), 'update 1');

  // Stop the gateway: the page is told 1001 and retries at once (free retry), then backs off.
  const exit = await gw.stop();
  assert.deepEqual(exit, { code: 0, signal: null }, `gateway exit after SIGTERM\n${gw.output}`);
  const goingAway = await tp.waitFor((e) => isStatus('d', 'reconnecting')(e) && e.closeCode === 1001, 'reconnecting after 1001');
  assert.equal(goingAway.attempt, 0);
  assert.equal(goingAway.delayMs, 0);
  assert.equal(goingAway.wasOpen, true);
  // With the gateway down, attempts 1, 2, 3 follow with growing delays.
  await tp.waitFor((e) => isStatus('d', 'reconnecting')(e) && e.attempt === 3, 'reconnect attempt 3 scheduled', 15000);

  await gw.start();
  const reopened = await tp.waitForNext(isStatus('d', 'open'), 'open after restart', 15000);
  assert.ok(reopened.attempt >= 3, `reopened on attempt ${reopened.attempt}`);

  const retries = tp.events.filter((e) => isStatus('d', 'reconnecting')(e) && e.attempt >= 1);
  const byAttempt = new Map(retries.map((e) => [e.attempt, e]));
  for (let n = 1; n <= 3; n++) {
    const e = byAttempt.get(n);
    assert.ok(e, `attempt ${n} reported`);
    const nominal = 200 * 2 ** (n - 1);
    assert.ok(e.delayMs >= nominal * 0.8 - 1 && e.delayMs <= nominal * 1.2 + 1, `attempt ${n}: delay ${e.delayMs} outside ${nominal} ±20 %`);
    assert.equal(e.closeCode, 1006, 'refused while the gateway is down');
    assert.equal(e.wasOpen, false);
  }
  // the reported delays were actually waited (page clock): attempt n+1 is scheduled >= delay(n) after attempt n
  for (let n = 1; n < 3; n++) {
    const gap = byAttempt.get(n + 1).t - byAttempt.get(n).t;
    assert.ok(gap >= byAttempt.get(n).delayMs - 5, `attempt ${n + 1} scheduled ${gap} ms after attempt ${n}, delay was ${byAttempt.get(n).delayMs}`);
  }
  assert.deepEqual(
    tp.events.filter((e) => e.kind === 'status' && e.svc === 'd').map((e) => e.status).filter((s, i, a) => s !== a[i - 1]),
    ['connecting', 'open', 'reconnecting', 'open'],
  );

  await probeRoute(tp, (nonce) => broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } }), { svc: 'd' });
  broker.publish(gw.queue, { user_id: user, message_type: 'update', data: { seq: 2 } });
  await tp.waitFor(isMessage('d', 'u', (e) => e.data?.seq === 2), 'update 2 after restart');
  assert.equal(tp.events.filter((e) => e.kind === 'error' && e.svc === 'd').length, 0);
});

test('example page connects from its query string and lists notifications', async (t) => {
  const gw = await startGateway(t);
  const user = randomId('erin');
  const tp = await TestPage.open(browser, `${web.origin}/example/index.html?url=${encodeURIComponent(gw.wsUrl)}&user_id=${encodeURIComponent(user)}`);
  t.after(() => tp.close());
  await tp.page.waitForSelector('#status[data-status="open"]', { timeout: 10000 });
  // route probe: publish until one shows up in the list
  const deadline = Date.now() + 10000;
  for (;;) {
    const nonce = randomId('probe');
    broker.publish(gw.queue, { user_id: user, message_type: 'probe', data: { nonce } });
    try {
      await tp.page.waitForSelector(`#notifications li:has-text("${nonce}")`, { timeout: 500 });
      break;
    } catch (e) {
      if (Date.now() > deadline) throw e;
    }
  }
  broker.publish(gw.queue, { user_id: user, message_type: 'welcome', data: { message: 'Hello from the example' } });
  broker.publish(gw.queue, { broadcast: true, message_type: 'notification', data: { title: 'to everyone' } });
  const li = await tp.page.waitForSelector('#notifications li[data-type="welcome"]', { timeout: 10000 });
  assert.match(await li.textContent(), /Hello from the example/);
  assert.match(await li.textContent(), new RegExp(`to ${user}`));
  const bli = await tp.page.waitForSelector('#notifications li[data-type="notification"]', { timeout: 10000 });
  assert.match(await bli.textContent(), /broadcast/);

  // A gateway restart on the same port: the page reconnects with since and shows the outcome;
  // what was published while the gateway was down is listed once.
  assert.equal(await tp.page.getAttribute('#recovery', 'data-recovered'), '');
  assert.deepEqual(await gw.stop(), { code: 0, signal: null });
  broker.publish(gw.queue, { user_id: user, message_type: 'while_down', data: { n: 1 } });
  await gw.start();
  await tp.page.waitForSelector('#recovery[data-recovered="true"]', { timeout: 20000 });
  assert.match(await tp.page.textContent('#recovery'), /^recovered at .*: \d+ missed notification/);
  await tp.page.waitForSelector('#notifications li[data-type="while_down"]', { timeout: 10000 });
  assert.equal(await tp.page.locator('#notifications li[data-type="while_down"]').count(), 1);
  await tp.page.click('#disconnect');
  await tp.page.waitForSelector('#status[data-status="closed"]', { timeout: 5000 });
});
