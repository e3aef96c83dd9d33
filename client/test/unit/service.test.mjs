// Frames, subscriptions, listeners and connect() arguments, with a fake WebSocket.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import webSocketService, { WebSocketService, WebSocketServiceError, createWebSocketService } from '../../dist/websocketService.js';
import { FakeWebSocket, flush, makeService } from './helpers.mjs';

const frame = (type, data, extra = {}) => ({ id: `id-${type}`, type, user_id: 'u1', timestamp: '2026-11-26T10:00:00.123Z', data, ...extra });

async function openService(t, opts) {
  const ctx = makeService(t, opts);
  ctx.svc.connect('u1');
  await flush();
  FakeWebSocket.latest().open();
  return ctx;
}

test('handlers receive (data, frame); several per type; "*" receives every frame', async (t) => {
  const { svc } = await openService(t);
  const calls = [];
  svc.subscribe('welcome', (data, f) => calls.push(['welcome#1', data, f.id]));
  svc.subscribe('welcome', (data) => calls.push(['welcome#2', data]));
  svc.subscribe('balance_update', (data) => calls.push(['balance', data]));
  svc.subscribe('*', (data, f) => calls.push(['*', f.type]));
  FakeWebSocket.latest().receive(frame('welcome', { message: 'Welcome!' }));
  FakeWebSocket.latest().receive(frame('balance_update', { balance: 3 }));
  FakeWebSocket.latest().receive(frame('other', null));
  assert.deepEqual(calls, [
    ['welcome#1', { message: 'Welcome!' }, 'id-welcome'],
    ['welcome#2', { message: 'Welcome!' }],
    ['*', 'welcome'],
    ['balance', { balance: 3 }],
    ['*', 'balance_update'],
    ['*', 'other'],
  ]);
});

test('each frame is parsed once, however many handlers', async (t) => {
  const { svc } = await openService(t);
  const parse = t.mock.method(JSON, 'parse');
  let seen = 0;
  for (let i = 0; i < 5; i++) svc.subscribe('welcome', () => seen++);
  svc.subscribe('*', () => seen++);
  FakeWebSocket.latest().receive(JSON.stringify(frame('welcome', { a: 1 })));
  assert.equal(seen, 6);
  assert.equal(parse.mock.callCount(), 1);
});

test('unsubscribe stops delivery, is idempotent, and leaves other subscriptions alone', async (t) => {
  const { svc } = await openService(t);
  const a = [];
  const b = [];
  const unsubA = svc.subscribe('welcome', (d) => a.push(d));
  svc.subscribe('welcome', (d) => b.push(d));
  FakeWebSocket.latest().receive(frame('welcome', 1));
  unsubA();
  unsubA();
  FakeWebSocket.latest().receive(frame('welcome', 2));
  assert.deepEqual(a, [1]);
  assert.deepEqual(b, [1, 2]);
});

test('the same function subscribed twice is called twice; each unsubscribe removes one', async (t) => {
  const { svc } = await openService(t);
  const got = [];
  const h = (d) => got.push(d);
  const u1 = svc.subscribe('x', h);
  svc.subscribe('x', h);
  FakeWebSocket.latest().receive(frame('x', 1));
  u1();
  FakeWebSocket.latest().receive(frame('x', 2));
  assert.deepEqual(got, [1, 1, 2]);
});

test('a handler unsubscribing another during dispatch: the other is not called for that frame', async (t) => {
  const { svc } = await openService(t);
  const got = [];
  let unsubB;
  svc.subscribe('x', () => {
    got.push('a');
    unsubB();
  });
  unsubB = svc.subscribe('x', () => got.push('b'));
  FakeWebSocket.latest().receive(frame('x', 1));
  assert.deepEqual(got, ['a']);
});

test('a throwing handler is reported and does not stop the others', async (t) => {
  const { svc, errors } = await openService(t);
  const got = [];
  svc.subscribe('welcome', () => {
    throw new Error('boom');
  });
  svc.subscribe('welcome', (d) => got.push(d));
  svc.subscribe('*', (d) => got.push(['*', d]));
  assert.doesNotThrow(() => FakeWebSocket.latest().receive(frame('welcome', 'hi')));
  assert.deepEqual(got, ['hi', ['*', 'hi']]);
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof WebSocketServiceError);
  assert.equal(errors[0].kind, 'handler');
  assert.equal(errors[0].frame.type, 'welcome');
  assert.equal(errors[0].cause.message, 'boom');
  assert.equal(svc.status, 'open');
});

test('malformed frames go to the error callback, never thrown, never to handlers', async (t) => {
  const { svc, errors } = await openService(t);
  const got = [];
  svc.subscribe('*', (d, f) => got.push(f));
  const bad = ['not json', '[1,2]', 'null', '42', '"str"', '{"data":1}', '{"type":""}', '{"type":7}', new ArrayBuffer(4)];
  for (const raw of bad) assert.doesNotThrow(() => FakeWebSocket.latest().receive(raw));
  assert.equal(got.length, 0);
  assert.equal(errors.length, bad.length);
  assert.ok(errors.every((e) => e.kind === 'malformed_frame'));
  assert.equal(errors[0].raw, 'not json');
  // the connection keeps working
  FakeWebSocket.latest().receive(frame('ok', 1));
  assert.equal(got.length, 1);
  assert.equal(svc.status, 'open');
});

test('onError passed to connect() and onError() listeners both receive errors', async (t) => {
  const viaOption = [];
  const { svc, errors } = makeService(t);
  svc.connect({ userId: 'u1', onError: (e) => viaOption.push(e.kind) });
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive('{');
  assert.deepEqual(viaOption, ['malformed_frame']);
  assert.equal(errors.length, 1);
});

test('with no error listener, errors go to console.error instead of being thrown', async (t) => {
  FakeWebSocket.reset();
  const svc = new WebSocketService({ url: 'ws://gateway.test/ws', WebSocket: FakeWebSocket });
  t.after(() => svc.disconnect());
  const logged = t.mock.method(console, 'error', () => {});
  svc.connect('u1');
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive('oops');
  assert.equal(logged.mock.callCount(), 1);
  assert.equal(logged.mock.calls[0].arguments[1].kind, 'malformed_frame');
});

test('status listeners: sequence, unsubscribe, and a throwing listener is isolated', async (t) => {
  const { svc, statuses, errors } = makeService(t);
  const other = [];
  svc.onStatusChange(() => {
    throw new Error('listener bug');
  });
  const off = svc.onStatusChange((s) => other.push(s));
  svc.connect('u1');
  await flush();
  FakeWebSocket.latest().open();
  off();
  svc.disconnect();
  assert.deepEqual(statuses.map((s) => s.status), ['connecting', 'open', 'closed']);
  assert.deepEqual(other, ['connecting', 'open']);
  assert.equal(errors.filter((e) => e.kind === 'status_listener').length, 3);
  assert.equal(svc.isConnected, false);
});

test('subscriptions made before connect() and kept across disconnect()/connect()', async (t) => {
  const { svc } = makeService(t);
  const got = [];
  svc.subscribe('welcome', (d) => got.push(d));
  svc.connect('u1');
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(frame('welcome', 1));
  svc.disconnect();
  svc.connect('u2');
  await flush();
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(frame('welcome', 2));
  assert.deepEqual(got, [1, 2]);
});

test('connect() with the same arguments while connected is a no-op; different arguments reconnect', async (t) => {
  const { svc, statuses } = makeService(t);
  svc.connect('u1');
  svc.connect('u1'); // e.g. a React effect run twice
  await flush();
  assert.equal(FakeWebSocket.instances.length, 1);
  const first = FakeWebSocket.latest();
  first.open();
  svc.connect('u1');
  await flush();
  assert.equal(FakeWebSocket.instances.length, 1);
  svc.connect('u2');
  await flush();
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.ok(first.closedByClient);
  assert.equal(FakeWebSocket.latest().params.get('user_id'), 'u2');
  assert.deepEqual(statuses.map((s) => s.status), ['connecting', 'open', 'connecting']);
});

test('URLs: user id and token are query parameters, properly encoded; http(s) becomes ws(s)', async (t) => {
  const { svc } = makeService(t);
  svc.connect({ url: 'https://notify.example.com/ws?x=1', userId: 'a b&c/é' });
  await flush();
  const u = new URL(FakeWebSocket.latest().url);
  assert.equal(u.protocol, 'wss:');
  assert.equal(u.searchParams.get('x'), '1');
  assert.equal(u.searchParams.get('user_id'), 'a b&c/é');
  svc.connect({ url: 'http://127.0.0.1:8081/ws', token: 'h.p.s' });
  await flush();
  assert.equal(FakeWebSocket.latest().url, 'ws://127.0.0.1:8081/ws?token=h.p.s');
});

test('default URL is ws(s)://<location.host>/ws; relative URLs resolve against the page', async (t) => {
  const saved = Object.getOwnPropertyDescriptor(globalThis, 'location');
  t.after(() => {
    if (saved) Object.defineProperty(globalThis, 'location', saved);
    else delete globalThis.location;
  });
  const setLocation = (href) => {
    const u = new URL(href);
    Object.defineProperty(globalThis, 'location', { value: { href: u.href, protocol: u.protocol, host: u.host }, configurable: true, writable: true });
  };
  FakeWebSocket.reset();
  const svc = new WebSocketService({ WebSocket: FakeWebSocket });
  t.after(() => svc.disconnect());
  setLocation('https://app.example.com:8443/dashboard?q=1');
  svc.connect('u1');
  await flush();
  assert.equal(FakeWebSocket.latest().url, 'wss://app.example.com:8443/ws?user_id=u1');
  setLocation('http://localhost:3000/');
  svc.connect('u2');
  await flush();
  assert.equal(FakeWebSocket.latest().url, 'ws://localhost:3000/ws?user_id=u2');
  svc.connect({ userId: 'u3', url: '/notify/ws' });
  await flush();
  assert.equal(FakeWebSocket.latest().url, 'ws://localhost:3000/notify/ws?user_id=u3');
});

test('programming errors throw TypeError synchronously', () => {
  const svc = new WebSocketService({ url: 'ws://x/ws', WebSocket: FakeWebSocket });
  assert.throws(() => svc.connect({}), TypeError);
  assert.throws(() => svc.connect(''), TypeError);
  assert.throws(() => svc.connect('x'.repeat(129)), TypeError);
  assert.throws(() => svc.connect({ userId: 'u1', token: 't' }), TypeError);
  assert.throws(() => svc.connect({ userId: 'u1', url: 'ftp://x/ws' }), TypeError);
  assert.throws(() => svc.connect({ userId: 'u1', initialDelayMs: -1 }), TypeError);
  assert.throws(() => svc.subscribe('', () => {}), TypeError);
  assert.throws(() => svc.subscribe('x', null), TypeError);
  assert.throws(() => new WebSocketService({ url: 'ws://x/ws' }).connect('u1'), /no WebSocket implementation/);
  assert.equal(svc.status, 'closed');
});

test("the seed's snippet works unchanged on the default export after configure()", async (t) => {
  FakeWebSocket.reset();
  webSocketService.configure({ url: 'ws://gateway.test/ws', WebSocket: FakeWebSocket });
  t.after(() => webSocketService.disconnect());
  const userId = '3f0c6d1e-0000-4000-8000-000000000001';
  const log = [];
  // --- seed snippet, verbatim apart from console.log -> log.push ---
  webSocketService.connect(userId);
  webSocketService.subscribe('welcome', (data) => {
    log.push(['Welcome message:', data]);
  });
  webSocketService.subscribe('balance_update', (data) => {
    log.push(['Balance updated:', data]);
  });
  // ---
  await flush();
  assert.equal(FakeWebSocket.latest().params.get('user_id'), userId);
  FakeWebSocket.latest().open();
  FakeWebSocket.latest().receive(frame('welcome', { message: 'Welcome!' }));
  FakeWebSocket.latest().receive(frame('balance_update', { balance: 10 }));
  assert.deepEqual(log, [
    ['Welcome message:', { message: 'Welcome!' }],
    ['Balance updated:', { balance: 10 }],
  ]);
  assert.ok(createWebSocketService() instanceof WebSocketService);
  assert.notEqual(createWebSocketService(), webSocketService);
});
