// Compile-time check of the React entry point as an app imports it, through the package's
// `exports` (`@wsnotify/client/react` → dist/react.d.ts). Never emitted or run.
import { useState } from 'react';
import webSocketService, { createWebSocketService, type NotificationFrame } from '@wsnotify/client';
import {
  WebSocketServiceProvider,
  useNotification,
  useNotificationStatus,
  useRecovery,
  useWebSocketService,
  type ConnectionStatus,
  type RecoveryEvent,
  type WebSocketService,
} from '@wsnotify/client/react';

interface Balance {
  balance: number;
  currency: string;
}

export function BalanceBadge() {
  const [balance, setBalance] = useState<Balance | null>(null);
  // Typed data and the whole frame.
  useNotification<Balance>('balance_update', (data, frame: NotificationFrame<Balance>) => {
    const n: number = data.balance;
    const id: string = frame.id;
    void [n, id];
    setBalance(data);
  });
  // Untyped: data is `any`, as in the seed's handlers; only `data` is taken.
  useNotification('welcome', (data) => console.log('Welcome message:', data.message));
  // After a reconnect the gateway could not vouch for: reload from the backend.
  useRecovery((e: RecoveryEvent) => {
    if (!e.recovered) void fetch('/api/balance');
  });
  const status: ConnectionStatus = useNotificationStatus();
  const service: WebSocketService = useWebSocketService();
  void service.isConnected;
  return (
    <p data-status={status}>
      {status === 'open' ? `${balance?.balance ?? '–'} ${balance?.currency ?? ''}` : status}
    </p>
  );
}

export function App() {
  const [own] = useState(() => createWebSocketService({ url: 'wss://notify.example.com/ws' }));
  return (
    <>
      <BalanceBadge />
      <WebSocketServiceProvider service={own}>
        <BalanceBadge />
      </WebSocketServiceProvider>
      <WebSocketServiceProvider service={webSocketService} />
    </>
  );
}

// @ts-expect-error: the handler's data is Balance, not string
useNotification<Balance>('balance_update', (data: string) => data);
// @ts-expect-error: the type is a string
useNotification(42, () => {});
// @ts-expect-error: the recovery listener gets an event, not a status
useRecovery((e: ConnectionStatus) => e);
// @ts-expect-error: a status is one of four strings
const wrong: 'online' = useNotificationStatus();
void wrong;
// @ts-expect-error: a provider needs a service
<WebSocketServiceProvider />;
