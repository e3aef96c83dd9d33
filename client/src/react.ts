/**
 * React bindings for `webSocketService`: `import { useNotification, useNotificationStatus } from '@wsnotify/client/react'`.
 *
 * A separate entry point, so the core module stays free of React. React (>= 18) is an optional
 * peer dependency: only apps that import this module need it.
 *
 * ```tsx
 * function Balance() {
 *   const [balance, setBalance] = useState<number>();
 *   useNotification<{ balance: number }>('balance_update', (data) => setBalance(data.balance));
 *   const status = useNotificationStatus();
 *   return <p>{status === 'open' ? balance : 'offline'}</p>;
 * }
 * ```
 *
 * `useRecovery(listener)` tells a component when to reload its state after a reconnect.
 *
 * The hooks use the shared `webSocketService` unless a {@link WebSocketServiceProvider} above
 * them supplies another instance. Connecting stays the app's call (`webSocketService.connect`),
 * made once, e.g. in the root component's effect.
 */
import { createContext, createElement, useCallback, useContext, useEffect, useLayoutEffect, useRef, useSyncExternalStore } from 'react';
import type { ReactElement, ReactNode } from 'react';
import webSocketService from './websocketService.js';
import type { ConnectionStatus, NotificationHandler, RecoveryListener, WebSocketService } from './websocketService.js';

const ServiceContext = createContext<WebSocketService>(webSocketService);

/** Props of {@link WebSocketServiceProvider}. */
export interface WebSocketServiceProviderProps {
  /** The instance the hooks below use, e.g. from `createWebSocketService()`. */
  service: WebSocketService;
  children?: ReactNode;
}

/** Makes the hooks below it use `service` instead of the shared `webSocketService`. */
export function WebSocketServiceProvider({ service, children }: WebSocketServiceProviderProps): ReactElement {
  return createElement(ServiceContext.Provider, { value: service }, children);
}

/** The service the hooks use here: the nearest provider's, else the shared `webSocketService`. */
export function useWebSocketService(): WebSocketService {
  return useContext(ServiceContext);
}

// Layout effects warn during server rendering in React 18; there is nothing to update there.
const useIsomorphicLayoutEffect = typeof document !== 'undefined' ? useLayoutEffect : useEffect;

/**
 * Calls `handler(data, frame)` for every notification of `type` (`'*'`: every notification)
 * while the component is mounted. Subscribes on mount and unsubscribes on unmount; a new
 * `handler` on each render is fine: the latest one is called, without resubscribing. Changing
 * `type` (or the provider's service) moves the subscription.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export function useNotification<T = any>(type: string, handler: NotificationHandler<T>): void {
  const service = useWebSocketService();
  const latest = useRef(handler);
  useIsomorphicLayoutEffect(() => {
    latest.current = handler;
  });
  useEffect(() => service.subscribe<T>(type, (data, frame) => latest.current(data, frame)), [service, type]);
}

/**
 * The service's current {@link ConnectionStatus} (`connecting`, `open`, `reconnecting`,
 * `closed`); the component re-renders when it changes.
 */
export function useNotificationStatus(): ConnectionStatus {
  const service = useWebSocketService();
  const subscribe = useCallback((onChange: () => void) => service.onStatusChange(() => onChange()), [service]);
  const snapshot = () => service.status;
  return useSyncExternalStore(subscribe, snapshot, snapshot);
}

/**
 * Calls `listener({ recovered, missed, since })` after each reconnect while the component is
 * mounted (see `WebSocketService.onRecovery`): when `recovered` is `false`, reload the state the
 * component shows from the backend. The latest `listener` is called, without resubscribing.
 */
export function useRecovery(listener: RecoveryListener): void {
  const service = useWebSocketService();
  const latest = useRef(listener);
  useIsomorphicLayoutEffect(() => {
    latest.current = listener;
  });
  useEffect(() => service.onRecovery((event) => latest.current(event)), [service]);
}

export type {
  ConnectionStatus,
  NotificationFrame,
  NotificationHandler,
  RecoveryEvent,
  RecoveryListener,
  WebSocketService,
} from './websocketService.js';
