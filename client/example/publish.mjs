// Publishes one notification to the gateway's queue, the way a backend would.
//
//   node example/publish.mjs alice welcome '{"message":"Welcome!"}'
//   node example/publish.mjs --broadcast notification '{"title":"Maintenance at 22:00"}'
//
// Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f),
// NOTIFY_QUEUE (default websocket_notifications). Needs `npm ci` (amqplib is a devDependency).
import amqplib from 'amqplib';

const [target, messageType = 'notification', json = 'null'] = process.argv.slice(2);
if (!target) {
  console.error("usage: node example/publish.mjs <user_id | --broadcast> [message_type] ['<json data>']");
  process.exit(2);
}
const url = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
const queue = process.env.NOTIFY_QUEUE || 'websocket_notifications';
const payload = { message_type: messageType, data: JSON.parse(json) };
if (target === '--broadcast') payload.broadcast = true;
else payload.user_id = target;

const conn = await amqplib.connect(url);
const ch = await conn.createConfirmChannel();
await ch.assertQueue(queue, { durable: true });
ch.sendToQueue(queue, Buffer.from(JSON.stringify({ type: 'websocket_notification', payload })), {
  contentType: 'application/json',
  persistent: true,
});
await ch.waitForConfirms();
await conn.close();
console.log(`published to ${queue}:`, JSON.stringify(payload));
