// The package's two entry points: the core module needs nothing (no React), the React one needs
// only React and the core; both are reachable through package.json `exports`. Plus server
// rendering of the hooks (no socket, status `closed`).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { createElement } from 'react';
import { renderToString } from 'react-dom/server';

const CLIENT_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const pkg = JSON.parse(readFileSync(join(CLIENT_DIR, 'package.json'), 'utf8'));

/** What a bundler pulls in for `entry` (package names resolved through `exports`). */
async function bundleInputs(entry, external = []) {
  const stdin = { contents: `export * from '${entry}';`, resolveDir: CLIENT_DIR, loader: 'js' };
  const r = await build({ stdin, bundle: true, write: false, metafile: true, format: 'esm', platform: 'browser', external, logLevel: 'silent' });
  const inputs = Object.keys(r.metafile.inputs).filter((i) => i !== '<stdin>');
  const imports = Object.values(r.metafile.outputs).flatMap((o) => o.imports.filter((i) => i.external).map((i) => i.path));
  return { inputs, imports };
}

test('the core entry bundles alone: no React, no other module', async () => {
  const { inputs, imports } = await bundleInputs('@wsnotify/client');
  assert.deepEqual(inputs, ['dist/websocketService.js']);
  assert.deepEqual(imports, []);
});

test('the React entry needs only React and the core module', async () => {
  const { inputs, imports } = await bundleInputs('@wsnotify/client/react', ['react']);
  assert.deepEqual(inputs.sort(), ['dist/react.js', 'dist/websocketService.js']);
  assert.deepEqual([...new Set(imports)], ['react']);
  assert.deepEqual(pkg.peerDependencies, { react: '>=18' });
  assert.deepEqual(pkg.peerDependenciesMeta, { react: { optional: true } });
  for (const file of Object.values(pkg.exports['./react'])) assert.ok(pkg.files.includes(file.slice(2)), `${file} is published`);
});

test('the hooks render on the server: status closed, no socket opened', async () => {
  const { default: webSocketService } = await import('@wsnotify/client');
  const { useNotification, useNotificationStatus, useRecovery } = await import('@wsnotify/client/react');
  let called = false;
  function Badge() {
    useNotification('welcome', () => {
      called = true;
    });
    useRecovery(() => {
      called = true;
    });
    return createElement('p', { id: 'status' }, useNotificationStatus());
  }
  assert.equal(renderToString(createElement(Badge)), '<p id="status">closed</p>');
  assert.equal(webSocketService.status, 'closed');
  assert.equal(called, false);
});
