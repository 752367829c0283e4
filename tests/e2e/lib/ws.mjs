// The Zero client looks up a browser-style global WebSocket; Node 20 has none, so use the `ws`
// package's (Node 22+ has a global one, which is replaced too so both Node versions run the same code).
import {WebSocket} from 'ws';

globalThis.WebSocket = WebSocket;
