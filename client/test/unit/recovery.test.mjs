// Recovery (contract §5): the last id handed to the app, `since` on reconnects, sessionStorage
// across reloads, the `wsnotify.recovery` control frame and onRecovery. Fake WebSocket, fake
// timers and a fake sessionStorage.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { WebSocketService } from '../../dist/websocketService.js';
import { FakeWebSocket, fakeTimers, flush, makeService } from './helpers.mjs';

const URL_ = 'ws://gateway.test/ws';
/** Where the id of user u1 on URL_ is kept (documented in the README). */
const KEY_U1 = 'wsnotify:lastId:["ws://gateway.test/ws","u1"]';
const frame = (id, type = 'm', data = null) => ({ id, type, user_id: 'u1', timestamp: '2026-11-26T10:00:00.123Z', data });
const recoveryFrame = (recovered, missed, since) => ({ type: 'wsnotify.recovery', recovered, missed, since });

/** A Map-backed sessionStorage on globalThis for this test; `fail` makes chosen methods throw. */
function fakeSessionStorage(t, { fail = {}, throwOnAccess = false } = {}) {
  const saved = Object.getOwnPropertyDescriptor(globalThis, 'sessionStorage');
  const map = new Map();
  const check = (name) => {
    if (fail[name]) throw new DOMException('The quota has been exceeded.', 'QuotaExceededError');
  };
  const storage = {
    getItem: (k) => (check('getItem'), map.has(k) ? map.get(k) : null),
    setItem: (k, v) => (check('setItem'), map.set(k, String(v))),
    removeItem: (k) => (check('removeItem'), map.delete(k)),
  };
  Object.defineProperty(globalThis, 'sessionStorage', {
    configurable: true,
    get() {
      if (throwOnAccess) throw new DOMException('The operation is insecure.', 'SecurityError');
      return storage;
    },
  });
  t.after(() => {
    if (saved) Object.defineProperty(globalThis, 'sessionStorage', saved);
    else delete globalThis.sessionStorage;
  });
  return map;
}

/** Records every recovery event of `svc`. */
function recoveries(svc) {
  const got = [];
  svc.onRecovery((e) => got.push(e));
  return got;
}

/** Runs the reconnect scheduled after a close (the free retry after 1001 has delay 0). */
async function reconnect(timers, ms = 0) {
  timers.tick(ms);
  await flush();
}

async function open(svc, user = 'u1') {
  svc.connect(user);
  await flush();
  FakeWebSocket.latest().open();
  return FakeWebSocket.latest();
}

test('the first connection sends no since; after a 1001 the reconnect sends the last id handed to the app', async (t) => {
  const timers = fakeTimers(t);
  fakeSessionStorage(t);
  const { svc } = makeService(t);
  const events = recoveries(svc);
  const first = await open(svc);
  assert.equal(first.params.get('since'), null);
  first.receive(frame('id-1'));
  first.receive(frame('id-2'));
  assert.equal(svc.lastId, 'id-2');
  first.serverClose(1001, 'going away');
  await reconnect(timers);
  const second = FakeWebSocket.latest();
  assert.notEqual(second, first);
  assert.equal(second.params.get('since'), 'id-2');
  assert.equal(second.params.get('user_id'), 'u1');
  second.open();
  assert.deepEqual(events, [], 'the outcome comes with the recovery frame');
});

test('the recovery frame goes to onRecovery, never to handlers; replayed frames then reach the handlers and move the id', async (t) => {
  const timers = fakeTimers(t);
  fakeSessionStorage(t);
  const { svc, errors } = makeService(t);
  const events = recoveries(svc);
  const got = [];
  svc.subscribe('*', (d, f) => got.push(f.id));
  svc.subscribe('wsnotify.recovery', () => got.push('typed handler must not run'));
  const first = await open(svc);
  first.receive(frame('a'));
  first.serverClose(1001);
  await reconnect(timers);
  const second = FakeWebSocket.latest();
  second.open();
  const order = [];
  svc.onRecovery(() => order.push(`recovery after ${got.length} frames`));
  second.receive(recoveryFrame(true, 2, 'a'));
  second.receive(frame('b'));
  second.receive(frame('c'));
  second.receive(frame('d'));
  assert.deepEqual(events, [{ recovered: true, missed: 2, since: 'a' }]);
  assert.deepEqual(order, ['recovery after 1 frames'], 'reported before the replayed frames are handed over');
  assert.deepEqual(got, ['a', 'b', 'c', 'd']);
  assert.equal(svc.lastId, 'd');
  assert.deepEqual(errors, []);
  // other gateway frames (reserved prefix) are not handed over either, and are no position
  second.receive({ type: 'wsnotify.future', id: 'x' });
  assert.deepEqual(got, ['a', 'b', 'c', 'd']);
  assert.equal(svc.lastId, 'd');
});

test('recovered false is reported as such (missed 0): the app should reload', async (t) => {
  const timers = fakeTimers(t);
  fakeSessionStorage(t);
  const { svc } = makeService(t);
  const events = recoveries(svc);
  const first = await open(svc);
  first.receive(frame('old'));
  first.serverClose(1006);
  await reconnect(timers, 1000);
  const second = FakeWebSocket.latest();
  assert.equal(second.params.get('since'), 'old');
  second.open();
  second.receive(recoveryFrame(false, 0, 'old'));
  assert.deepEqual(events, [{ recovered: false, missed: 0, since: 'old' }]);
});

test('since is added on every kind of reconnect: network drop with backoff, failed retries, token refresh after 1008', async (t) => {
  fakeSessionStorage(t);
  const timers = fakeTimers(t);
  const { svc } = makeService(t);
  let n = 0;
  const token = () => `${Buffer.from('{"alg":"HS256"}').toString('base64url')}.${Buffer.from(JSON.stringify({ sub: 'jwt-user', exp: 4102444800, n: ++n })).toString('base64url')}.sig`;
  svc.connect({ getToken: token });
  await flush();
  FakeWebSocket.latest().open();
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
  FakeWebSocket.latest().receive(frame('j1'));
  // network drop (1006): attempt 1 after 1 s, refused (e.g. 503 from a replica still filling its history), attempt 2 after 2 s
  FakeWebSocket.latest().serverClose(1006);
  timers.tick(1000);
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), 'j1');
  FakeWebSocket.latest().failHandshake();
  assert.equal(svc.status, 'reconnecting', 'a refused since-handshake is an ordinary failed attempt');
  timers.tick(2000);
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), 'j1');
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(recoveryFrame(true, 0, 'j1'));
  FakeWebSocket.latest().receive(frame('j2'));
  // token expired: 1008, a new token, and since
  FakeWebSocket.latest().serverClose(1008, 'token expired');
  timers.tick(1000);
  await flush();
  const last = FakeWebSocket.latest();
  assert.equal(last.params.get('since'), 'j2');
  assert.ok(last.params.get('token'), 'a token as well');
  assert.equal(FakeWebSocket.instances.length, 4);
});

test('after a reload (a new service, same tab) the first connect() resumes from sessionStorage', async (t) => {
  const storage = fakeSessionStorage(t);
  const before = makeService(t).svc;
  const ws = await open(before);
  ws.receive(frame('p1'));
  ws.receive(frame('p2'));
  assert.equal(storage.size, 1);
  const [key] = storage.keys();
  assert.equal(key, KEY_U1);
  assert.equal(storage.get(key), 'p2');
  before.disconnect();

  // "reload": a fresh instance, as a new page would create
  FakeWebSocket.reset();
  const after = new WebSocketService({ url: URL_, WebSocket: FakeWebSocket });
  t.after(() => after.disconnect());
  const events = recoveries(after);
  after.connect('u1');
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), 'p2');
  assert.equal(after.lastId, 'p2');
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(recoveryFrame(true, 1, 'p2'));
  FakeWebSocket.latest().receive(frame('p3'));
  assert.deepEqual(events, [{ recovered: true, missed: 1, since: 'p2' }]);
  assert.equal(storage.get(key), 'p3');
});

test('another user in the same tab does not resume from the first one\'s id', async (t) => {
  const storage = fakeSessionStorage(t);
  const { svc } = makeService(t);
  const ws = await open(svc, 'alice');
  ws.receive(frame('alice-1'));
  svc.connect('bob');
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(frame('bob-1'));
  assert.equal(storage.size, 2);
  // back to alice: her own id, from memory or storage
  svc.connect('alice');
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), 'alice-1');
  // and another gateway URL is another key
  svc.connect({ userId: 'alice', url: 'ws://other.test/ws' });
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
});

test('JWT mode keys the id by the token\'s sub', async (t) => {
  const storage = fakeSessionStorage(t);
  const { svc } = makeService(t);
  const jwt = (sub) => `e30.${Buffer.from(JSON.stringify({ sub, exp: 4102444800 })).toString('base64url')}.sig`;
  svc.connect({ token: jwt('карина') });
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(frame('k1'));
  assert.ok([...storage.keys()][0].includes('карина'), [...storage.keys()].join());
  svc.connect({ token: jwt('someone-else') });
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
  svc.connect({ token: jwt('карина') });
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), 'k1');
});

test('persistLastId: false keeps the id in memory only: reconnects recover, a reload does not', async (t) => {
  const timers = fakeTimers(t);
  const storage = fakeSessionStorage(t);
  const { svc } = makeService(t, { persistLastId: false });
  const ws = await open(svc);
  ws.receive(frame('m1'));
  assert.equal(storage.size, 0);
  ws.serverClose(1001);
  await reconnect(timers);
  assert.equal(FakeWebSocket.latest().params.get('since'), 'm1');
  storage.set(KEY_U1, 'm1'); // as if another page had stored it: must not be read
  const fresh = new WebSocketService({ url: URL_, WebSocket: FakeWebSocket, persistLastId: false });
  t.after(() => fresh.disconnect());
  fresh.connect('u1');
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
});

test('recovery: false sends no since, stores nothing, and reports every reconnect as not recovered', async (t) => {
  const timers = fakeTimers(t);
  const storage = fakeSessionStorage(t);
  const { svc } = makeService(t, { recovery: false });
  const events = recoveries(svc);
  const ws = await open(svc);
  ws.receive(frame('r1'));
  assert.equal(storage.size, 0);
  ws.serverClose(1001);
  await reconnect(timers);
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
  FakeWebSocket.latest().open();
  assert.deepEqual(events, [{ recovered: false, missed: 0, since: null }]);
});

test('a reconnect with no id to ask with (nothing received yet) is reported as not recovered', async (t) => {
  const timers = fakeTimers(t);
  fakeSessionStorage(t);
  const { svc } = makeService(t);
  const events = recoveries(svc);
  const ws = await open(svc);
  assert.deepEqual(events, [], 'not on the first connection');
  ws.serverClose(1001);
  await reconnect(timers);
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
  FakeWebSocket.latest().open();
  assert.deepEqual(events, [{ recovered: false, missed: 0, since: null }]);
});

test('sessionStorage that throws on access, on reads or on writes: recovery still works from memory, nothing thrown', async (t) => {
  for (const variant of [{ throwOnAccess: true }, { fail: { getItem: true, setItem: true, removeItem: true } }, { fail: { setItem: true } }]) {
    await t.test(JSON.stringify(variant), async (t) => {
      const timers = fakeTimers(t);
      const storage = fakeSessionStorage(t, variant);
      const { svc, errors } = makeService(t);
      const got = [];
      svc.subscribe('*', (d, f) => got.push(f.id));
      const ws = await open(svc);
      ws.receive(frame('s1'));
      ws.receive(frame('s2'));
      assert.deepEqual(got, ['s1', 's2']);
      assert.equal(storage.size, 0, 'nothing stale left behind');
      ws.serverClose(1001);
      await reconnect(timers);
      assert.equal(FakeWebSocket.latest().params.get('since'), 's2');
      assert.deepEqual(errors, []);
    });
  }
});

test('no sessionStorage at all (Node, workers): memory only', async (t) => {
  const timers = fakeTimers(t);
  assert.equal(globalThis.sessionStorage, undefined);
  const { svc } = makeService(t);
  const ws = await open(svc);
  ws.receive(frame('n1'));
  ws.serverClose(1001);
  await reconnect(timers);
  assert.equal(FakeWebSocket.latest().params.get('since'), 'n1');
});

test('ids that cannot be sent back as since (over 64 bytes, missing) are not resumed from, nor is the older id', async (t) => {
  const timers = fakeTimers(t);
  const storage = fakeSessionStorage(t);
  const { svc } = makeService(t);
  const ws = await open(svc);
  ws.receive(frame('ok-1'));
  ws.receive(frame('x'.repeat(65)));
  assert.equal(svc.lastId, undefined);
  assert.equal(storage.size, 0);
  ws.receive(frame('é'.repeat(32))); // 64 bytes
  assert.equal(svc.lastId, 'é'.repeat(32));
  ws.receive({ type: 'm', data: 1 });
  assert.equal(svc.lastId, undefined);
  ws.serverClose(1001);
  await reconnect(timers);
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
  // a stored value that could not have come from the gateway is ignored
  storage.set(KEY_U1, '');
  const fresh = new WebSocketService({ url: URL_, WebSocket: FakeWebSocket });
  t.after(() => fresh.disconnect());
  fresh.connect('u1');
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('since'), null);
});

test('a throwing recovery listener is reported and does not stop the others or the frames', async (t) => {
  const timers = fakeTimers(t);
  fakeSessionStorage(t);
  const { svc, errors } = makeService(t);
  const got = [];
  svc.onRecovery(() => {
    throw new Error('listener bug');
  });
  const off = svc.onRecovery((e) => got.push(e.recovered));
  svc.subscribe('*', (d, f) => got.push(f.id));
  const ws = await open(svc);
  ws.receive(frame('t1'));
  ws.serverClose(1001);
  await reconnect(timers);
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(recoveryFrame(true, 1, 't1'));
  FakeWebSocket.latest().receive(frame('t2'));
  assert.deepEqual(got, ['t1', true, 't2']);
  assert.deepEqual(errors.map((e) => e.kind), ['recovery_listener']);
  off();
  assert.throws(() => svc.onRecovery(null), TypeError);
});

test('the seed API is unchanged: connect(userId) then subscribe, with recovery on by default', async (t) => {
  fakeSessionStorage(t);
  const { svc } = makeService(t);
  const log = [];
  svc.connect('3f0c6d1e-0000-4000-8000-000000000001');
  svc.subscribe('welcome', (data) => log.push(data));
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(frame('w1', 'welcome', { message: 'Welcome!' }));
  assert.deepEqual(log, [{ message: 'Welcome!' }]);
  assert.equal(new URL(FakeWebSocket.latest().url).search, '?user_id=3f0c6d1e-0000-4000-8000-000000000001');
});
