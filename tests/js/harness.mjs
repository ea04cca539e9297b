// Test harness for the fanout end-to-end suite: starts `fanout serve`
// processes, connects stock socket.io-client sessions, collects events and
// calls the HTTP API. Only node built-ins and socket.io-client.
//
// Environment:
//   FANOUT_BIN                path of the `fanout` binary (required)
//   FANOUT_E2E_DATABASE_URL   database for the servers (unset = SQLite in a
//                             temporary data directory)
//   FANOUT_E2E_VERBOSE=1      copy every server's stderr to this stderr
//   FANOUT_E2E_RABBITMQ_URL   FANOUT_RABBITMQ_URL of the servers (unset = the
//                             default, the local broker); a comma-separated
//                             list runs them on a RabbitMQ cluster

import { spawn, execFile } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';

/** Generous wait for anything that must happen. */
export const WAIT_MS = 5000;
/** Quiet period after a sentinel before asserting that nothing else arrived. */
export const QUIET_MS = 300;

export const UUID_V7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
export const RFC3339_UTC_MS = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

const live = new Set(); // child processes not yet reaped
process.on('exit', () => {
  for (const child of live) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A fresh valid id (user or channel), unique per call. */
export function uid(prefix = 'u') {
  return `${prefix}-${randomBytes(6).toString('hex')}`;
}

/** Fresh user ids, one per prefix: `const [alice, bob] = users('alice', 'bob')`. */
export function users(...prefixes) {
  return prefixes.map((p) => uid(p));
}

/** A JWT signed HS256 with `secret` (or with `header`'s alg left as given). */
export function signJwt(claims, secret, header = { alg: 'HS256', typ: 'JWT' }) {
  const h = Buffer.from(JSON.stringify(header)).toString('base64url');
  const p = Buffer.from(JSON.stringify(claims)).toString('base64url');
  const sig = createHmac('sha256', secret).update(`${h}.${p}`).digest('base64url');
  return `${h}.${p}.${sig}`;
}

export function nowSecs() {
  return Math.floor(Date.now() / 1000);
}

function binPath() {
  const bin = process.env.FANOUT_BIN;
  if (!bin) throw new Error('FANOUT_BIN must name the fanout binary (cargo build; FANOUT_BIN=$PWD/target/debug/fanout)');
  return bin;
}

/** The environment for a fanout process: ours without any FANOUT_* variable, plus `vars`. */
function childEnv(vars) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('FANOUT_')) env[k] = v;
  }
  return { ...env, ...vars };
}

/**
 * Starts one fanout process (`serve`, `gateway` or `worker`) with `vars` as
 * its FANOUT_* environment; resolves once it is ready (a gateway or serve
 * prints its listening line; a worker is given a moment to join).
 */
async function startProcess(command, vars, cwd) {
  const env = childEnv(vars);
  const bin = binPath();
  const child = spawn(bin, [command], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  const proc = { child, command, stderr: '', stdout: '', stopping: false, exited: null, url: null };
  proc.exitPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      live.delete(child);
      proc.exited = { code, signal };
      if (!proc.stopping) {
        console.error(`fanout ${command} exited unexpectedly (code ${code}, signal ${signal}); stderr:\n${proc.stderr}`);
      }
      resolve(proc.exited);
    });
  });
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => {
    proc.stderr += d;
    if (proc.stderr.length > 200_000) proc.stderr = proc.stderr.slice(-100_000);
    if (process.env.FANOUT_E2E_VERBOSE === '1') process.stderr.write(d);
  });
  child.stdout.setEncoding('utf8');
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      fail(new Error(`fanout ${command} was not ready within 30 s.\nstdout:\n${proc.stdout}\nstderr:\n${proc.stderr}`));
    }, 30_000);
    function fail(err) {
      clearTimeout(timer);
      proc.stopping = true;
      child.kill('SIGKILL');
      reject(err);
    }
    child.on('error', (e) => fail(new Error(`cannot start ${bin}: ${e.message}`)));
    child.on('exit', (code, signal) => {
      fail(new Error(`fanout ${command} exited (code ${code}, signal ${signal}) before it was ready.\nstdout:\n${proc.stdout}\nstderr:\n${proc.stderr}`));
    });
    child.stdout.on('data', (d) => {
      proc.stdout += d;
      const m = /fanout: listening on (http:\/\/\S+) as (\S+)/.exec(proc.stdout);
      if (m) {
        clearTimeout(timer);
        proc.url = m[1];
        resolve();
      }
    });
    if (command === 'worker') {
      // A worker prints nothing when ready; its consumers join at once.
      setTimeout(() => { clearTimeout(timer); resolve(); }, 500);
    }
  });
  proc.stop = async () => {
    proc.stopping = true;
    if (!proc.exited) {
      child.kill('SIGTERM');
      const t = setTimeout(() => { if (!proc.exited) child.kill('SIGKILL'); }, 5000);
      await proc.exitPromise;
      clearTimeout(t);
    }
  };
  return proc;
}

/** The broker backend the suite runs on: FANOUT_E2E_BACKEND, default memory. */
export const BACKEND = process.env.FANOUT_E2E_BACKEND || 'memory';
/** Gateways and workers of a broker-backed run. */
const GATEWAYS = 3;
const WORKERS = 2;

/**
 * Starts the system: on the memory backend one `fanout serve`; on a broker
 * backend (FANOUT_E2E_BACKEND=rabbitmq|redis) three `fanout gateway` and
 * two `fanout worker` processes sharing a fresh namespace, with sessions
 * and API calls spread round-robin over the gateways, so every test also
 * crosses gateways.
 *
 * options.env: extra FANOUT_* settings (e.g. FANOUT_LIMITS__MESSAGE_BURST).
 * options.jwtSecret: the HS256 secret; `null` leaves it unset so the server
 *   generates one in its data directory (then only `cliToken` works; memory only).
 * options.dataDir: reuse a data directory (see `restart`).
 * options.namespace: reuse a broker namespace (see `restart`).
 */
export async function startServer(options = {}) {
  const dataDir = options.dataDir || mkdtempSync(join(tmpdir(), 'fanout-e2e-'));
  const cluster = BACKEND !== 'memory';
  const jwtSecret = options.jwtSecret === undefined || (cluster && options.jwtSecret === null)
    ? (options.jwtSecret || randomBytes(24).toString('hex'))
    : options.jwtSecret;
  const namespace = options.namespace || `e2e${randomBytes(5).toString('hex')}`;
  const vars = {
    FANOUT_LISTEN: '127.0.0.1:0',
    FANOUT_DATA_DIR: dataDir,
    FANOUT_LOG: process.env.FANOUT_E2E_LOG || 'warn',
    ...(jwtSecret ? { FANOUT_JWT_SECRET: jwtSecret } : {}),
    ...(process.env.FANOUT_E2E_DATABASE_URL ? { FANOUT_DATABASE_URL: process.env.FANOUT_E2E_DATABASE_URL } : {}),
    ...(process.env.FANOUT_E2E_RABBITMQ_URL ? { FANOUT_RABBITMQ_URL: process.env.FANOUT_E2E_RABBITMQ_URL } : {}),
    // A generous broker timeout: CI machines are small and shared.
    ...(cluster ? { FANOUT_BACKEND: BACKEND, FANOUT_NAMESPACE: namespace, FANOUT_BROKER_TIMEOUT_MS: '15000' } : {}),
    ...(options.env || {}),
  };
  const bin = binPath();
  const procs = [];
  try {
    if (cluster) {
      for (let i = 0; i < WORKERS; i++) procs.push(await startProcess('worker', vars, dataDir));
      for (let i = 0; i < GATEWAYS; i++) procs.push(await startProcess('gateway', vars, dataDir));
    } else {
      procs.push(await startProcess('serve', vars, dataDir));
    }
  } catch (e) {
    await Promise.all(procs.map((p) => p.stop()));
    throw e;
  }
  const urls = procs.filter((p) => p.url).map((p) => p.url);
  let next = 0;
  const pick = () => urls[next++ % urls.length];

  const sockets = new Set();

  const server = {
    url: urls[0],
    urls,
    dataDir,
    jwtSecret,
    env: vars,
    get stderr() { return procs.map((p) => p.stderr).join('\n'); },
    /** A valid token for `user`, signed in JS (needs a known secret). */
    token(user, ttlSecs = 3600) {
      assert.ok(jwtSecret, 'this server generated its own secret; use cliToken');
      return signJwt({ sub: user, exp: nowSecs() + ttlSecs }, jwtSecret);
    },
    /** A token minted by `fanout token <user>` with this server's environment. */
    cliToken(user, extraArgs = []) {
      return new Promise((resolve, reject) => {
        execFile(bin, ['token', user, ...extraArgs], { cwd: dataDir, env: childEnv(vars), timeout: 30_000 }, (err, out, errOut) => {
          if (err) reject(new Error(`fanout token failed: ${err.message}\n${errOut}`));
          else resolve(out.trim());
        });
      });
    },
    /** connect() on the next gateway (opts.gateway picks one); closed by stop(). */
    async connect(token, opts = {}) {
      const { gateway, ...rest } = opts;
      const url = gateway === undefined ? pick() : urls[gateway % urls.length];
      return connect(url, token, rest, sockets);
    },
    /** A connected session for a user (token signed in JS). */
    session(user, opts = {}) {
      return server.connect(server.token(user), opts);
    },
    /**
     * One connected session per user given (a user named twice gets two
     * tabs), opened one after another so the order of tabs is the test's.
     */
    async sessions(...userIds) {
      const out = [];
      for (const u of userIds) out.push(await server.session(u));
      return out;
    },
    /** fetch on the next gateway's API (opts.gateway picks one). */
    api(method, path, opts = {}) {
      const { gateway, ...rest } = opts;
      const url = gateway === undefined ? pick() : urls[gateway % urls.length];
      return api(url, method, path, rest);
    },
    /**
     * Stops every process (keeping the data) and starts the same system
     * again on the same data directory, database, namespace and secret.
     */
    async restart() {
      await server.stop({ keepData: true });
      return startServer({ ...options, dataDir, jwtSecret, namespace });
    },
    async stop({ keepData = false } = {}) {
      for (const s of sockets) s.close();
      sockets.clear();
      // Gateways first, so workers can still drain what they accepted.
      await Promise.all(procs.filter((p) => p.url).map((p) => p.stop()));
      await Promise.all(procs.filter((p) => !p.url).map((p) => p.stop()));
      if (cluster && !keepData) {
        // Leave nothing on the shared broker.
        await new Promise((resolve) => {
          execFile(bin, ['purge-namespace', '--yes'], { cwd: dataDir, env: childEnv(vars), timeout: 30_000 }, (err, _out, errOut) => {
            if (err) console.error(`purge-namespace failed: ${err.message}\n${errOut}`);
            resolve();
          });
        });
      }
      if (!keepData) {
        try { rmSync(dataDir, { recursive: true, force: true }); } catch { /* best effort */ }
      }
    },
  };
  return server;
}

/**
 * Connects a Socket.IO session. Resolves with the connected socket, or
 * rejects with the `connect_error` (its `message` is the server's reason).
 * `token === undefined` sends no token; opts.auth replaces the whole auth
 * object. Reconnection is off so a closed session stays closed.
 */
export function connect(url, token, opts = {}, registry = null) {
  const auth = 'auth' in opts ? opts.auth : (token === undefined ? {} : { token });
  const { auth: _ignored, ...rest } = opts;
  const socket = io(url, {
    forceNew: true,
    reconnection: false,
    timeout: WAIT_MS,
    auth,
    ...rest,
  });
  if (registry) registry.add(socket);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      socket.close();
      reject(new Error('connect timed out'));
    }, WAIT_MS * 2);
    function cleanup() {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('connect_error', onError);
    }
    function onConnect() {
      cleanup();
      resolve(socket);
    }
    function onError(err) {
      cleanup();
      socket.close();
      reject(err);
    }
    // Registered synchronously after io(), before any I/O can complete; the
    // connected check covers a connect that somehow already happened.
    socket.on('connect', onConnect);
    socket.on('connect_error', onError);
    if (socket.connected) onConnect();
  });
}

/**
 * Records every payload of `eventName` on `socket` from now on.
 * `waitFor(n)` resolves with the items once at least n arrived, or rejects
 * after `timeout` ms with what did arrive.
 */
export function collect(socket, eventName) {
  const items = [];
  let waiters = [];
  const listener = (payload) => {
    items.push(payload);
    waiters = waiters.filter((w) => {
      if (items.length >= w.n) {
        clearTimeout(w.timer);
        w.resolve(items);
        return false;
      }
      return true;
    });
  };
  socket.on(eventName, listener);
  return {
    items,
    event: eventName,
    waitFor(n, timeout = WAIT_MS) {
      if (items.length >= n) return Promise.resolve(items);
      return new Promise((resolve, reject) => {
        const w = { n, resolve };
        w.timer = setTimeout(() => {
          waiters = waiters.filter((x) => x !== w);
          reject(new Error(`timed out after ${timeout} ms waiting for ${n} ${eventName} event(s); got ${items.length}: ${JSON.stringify(items).slice(0, 2000)}`));
        }, timeout);
        waiters.push(w);
      });
    },
    /** Waits until some item satisfies `pred`; resolves with it. */
    async waitUntil(pred, timeout = WAIT_MS) {
      const deadline = Date.now() + timeout;
      for (;;) {
        const hit = items.find(pred);
        if (hit) return hit;
        const left = deadline - Date.now();
        if (left <= 0) {
          throw new Error(`timed out waiting for a matching ${eventName} event; got ${items.length}: ${JSON.stringify(items).slice(0, 2000)}`);
        }
        await this.waitFor(items.length + 1, left).catch(() => {});
      }
    },
    stop() { socket.off(eventName, listener); },
  };
}

/** Emits with an acknowledgement; rejects if none comes within `timeout`. */
export function send(socket, payload, timeout = WAIT_MS) {
  return socket.timeout(timeout).emitWithAck('sendMessage', payload);
}

/** Calls the HTTP API: { status, body (JSON or text), headers }. */
export async function api(baseUrl, method, path, { token, body, headers = {} } = {}) {
  const h = { ...headers };
  if (token !== undefined) h.authorization = `Bearer ${token}`;
  let payload;
  if (body !== undefined) {
    h['content-type'] = 'application/json';
    payload = typeof body === 'string' ? body : JSON.stringify(body);
  }
  const res = await fetch(new URL(path, baseUrl), { method, headers: h, body: payload });
  const text = await res.text();
  let parsed = text;
  if ((res.headers.get('content-type') || '').includes('json')) {
    try { parsed = JSON.parse(text); } catch { /* leave as text */ }
  }
  return { status: res.status, body: parsed, headers: res.headers };
}

/** Asserts an ack is `{ ok: true, id: UUIDv7, createdAt: RFC 3339 UTC ms }` and returns it. */
export function assertOkAck(ack, what = 'ack') {
  assert.equal(typeof ack, 'object', `${what}: ${JSON.stringify(ack)}`);
  assert.deepEqual(Object.keys(ack).sort(), ['createdAt', 'id', 'ok'], `${what} fields: ${JSON.stringify(ack)}`);
  assert.equal(ack.ok, true, `${what}: ${JSON.stringify(ack)}`);
  assert.match(ack.id, UUID_V7, `${what} id is a UUIDv7`);
  assertTime(ack.createdAt, `${what} createdAt`);
  return ack;
}

/** Asserts an ack is `{ ok: false, error: { code, message } }` with `code`. */
export function assertErrAck(ack, code, what = 'ack') {
  assert.equal(typeof ack, 'object', `${what}: ${JSON.stringify(ack)}`);
  assert.deepEqual(Object.keys(ack).sort(), ['error', 'ok'], `${what} fields: ${JSON.stringify(ack)}`);
  assert.equal(ack.ok, false, `${what}: ${JSON.stringify(ack)}`);
  assert.deepEqual(Object.keys(ack.error).sort(), ['code', 'message'], `${what} error fields: ${JSON.stringify(ack)}`);
  assert.equal(ack.error.code, code, `${what}: ${JSON.stringify(ack)}`);
  assert.equal(typeof ack.error.message, 'string');
  assert.ok(ack.error.message.length > 0, `${what}: error message is not empty`);
}

/** RFC 3339 UTC with milliseconds, and close to now. */
export function assertTime(s, what = 'createdAt') {
  assert.equal(typeof s, 'string', `${what} is a string`);
  assert.match(s, RFC3339_UTC_MS, `${what} ${s} is RFC 3339 UTC with milliseconds`);
  const t = Date.parse(s);
  assert.ok(Math.abs(Date.now() - t) < 120_000, `${what} ${s} is near now`);
}

/** The exact personal event a send should produce. */
export function personalEvent(ack, senderId, receiverId, content, clientMsgId) {
  const e = { id: ack.id, senderId, receiverId, content, createdAt: ack.createdAt };
  if (clientMsgId !== undefined) e.clientMsgId = clientMsgId;
  return e;
}

/** The exact group event a send should produce. */
export function groupEvent(ack, channelId, senderId, content, clientMsgId) {
  const e = { id: ack.id, channelId, senderId, content, createdAt: ack.createdAt };
  if (clientMsgId !== undefined) e.clientMsgId = clientMsgId;
  return e;
}

/** Creates a channel as `token`'s user; returns its id (asserts 201). */
export async function createChannel(server, token, { id, name = 'test channel', members = [] } = {}) {
  const body = { name, members };
  if (id !== undefined) body.id = id;
  const r = await server.api('POST', '/api/channels', { token, body });
  assert.equal(r.status, 201, `create channel: ${r.status} ${JSON.stringify(r.body)}`);
  assert.deepEqual(Object.keys(r.body), ['id'], `create channel body: ${JSON.stringify(r.body)}`);
  if (id !== undefined) assert.equal(r.body.id, id);
  return r.body.id;
}

/** GET a history page; asserts 200 and the page shape; returns the body. */
export async function history(server, token, path, query = {}) {
  const qs = new URLSearchParams(query).toString();
  const r = await server.api('GET', qs ? `${path}?${qs}` : path, { token });
  assert.equal(r.status, 200, `GET ${path}?${qs}: ${r.status} ${JSON.stringify(r.body)}`);
  assert.deepEqual(Object.keys(r.body).sort(), ['messages', 'nextBefore'], `history body: ${JSON.stringify(r.body).slice(0, 500)}`);
  assert.ok(Array.isArray(r.body.messages));
  assert.ok(r.body.nextBefore === null || typeof r.body.nextBefore === 'string');
  return r.body;
}

/** Asserts an HTTP error response: `status` and `{ error: { code, message } }`. */
export function assertHttpError(r, status, what = 'response') {
  assert.equal(r.status, status, `${what}: ${r.status} ${JSON.stringify(r.body)}`);
  assert.equal(typeof r.body, 'object', `${what}: JSON error body, got ${JSON.stringify(r.body)}`);
  assert.equal(typeof r.body.error, 'object', `${what}: ${JSON.stringify(r.body)}`);
  assert.equal(typeof r.body.error.code, 'string', `${what}: ${JSON.stringify(r.body)}`);
  assert.equal(typeof r.body.error.message, 'string', `${what}: ${JSON.stringify(r.body)}`);
}

/** Closes a socket and waits until the client has seen the disconnect. */
export async function closeSocket(socket) {
  if (!socket.connected) {
    socket.close();
    return;
  }
  const gone = new Promise((r) => socket.once('disconnect', r));
  socket.close();
  await gone;
}

/**
 * The value of a metric (first sample named `name`) summed over the
 * server's gateways, or null if no gateway exports it.
 */
export async function metric(server, name) {
  let total = null;
  for (let g = 0; g < (server.urls?.length || 1); g++) {
    const r = await server.api('GET', '/metrics', { gateway: g });
    if (r.status !== 200 || typeof r.body !== 'string') continue;
    const m = new RegExp(`^${name}(?:\\{[^}]*\\})? ([0-9.eE+-]+)$`, 'm').exec(r.body);
    if (m) total = (total ?? 0) + Number(m[1]);
  }
  return total;
}

/**
 * Closes a session and waits until the server has ended it too (its
 * `fanout_sessions` gauge dropped), so later steps test the state after
 * the disconnect rather than racing it.
 */
export async function closeAndSettle(server, socket) {
  const before = await metric(server, 'fanout_sessions');
  await closeSocket(socket);
  if (before === null) {
    await sleep(QUIET_MS);
    return;
  }
  const deadline = Date.now() + WAIT_MS;
  while (Date.now() < deadline) {
    const now = await metric(server, 'fanout_sessions');
    if (now !== null && now <= before - 1) return;
    await sleep(20);
  }
  throw new Error('the server did not end the closed session within 5 s (fanout_sessions did not drop)');
}

// ---------------------------------------------------------------------------
// Positions (docs/protocol.md, "Positions and resume"): every delivered
// event and history item carries `stream` and `seq`; membership changes
// arrive as MEMBERSHIP_CHANGE. Helpers for the expected shapes.

/** `e` (a personal event) at position `seq` of the session user's inbox. */
export function inboxAt(e, seq) {
  return { ...e, stream: 'inbox', seq };
}

/** `e` (a group event) at position `seq` of its channel's stream. */
export function channelAt(e, seq) {
  return { ...e, stream: `channel:${e.channelId}`, seq };
}

/** `events` at consecutive positions of `stream` from `first`. */
export function positioned(events, stream, first) {
  return events.map((e, i) => ({ ...e, stream, seq: first + i }));
}

/**
 * The exact MEMBERSHIP_CHANGE expected, without its `createdAt` (compare
 * with `membershipItems(received)`). `stream` is 'inbox' or omitted for the
 * channel's stream.
 */
export function membershipEvent({ stream, seq, channelId, userId, change, byUserId }) {
  return { stream: stream ?? `channel:${channelId}`, seq, channelId, userId, change, byUserId };
}

/**
 * Asserts every received MEMBERSHIP_CHANGE has a `createdAt` in the
 * messages' format, near now, and returns copies without it.
 */
export function membershipItems(items) {
  return items.map((x) => {
    assert.deepEqual(Object.keys(x).sort(), ['byUserId', 'change', 'channelId', 'createdAt', 'seq', 'stream', 'userId'],
      `MEMBERSHIP_CHANGE fields: ${JSON.stringify(x)}`);
    assertTime(x.createdAt, 'MEMBERSHIP_CHANGE createdAt');
    const { createdAt: _t, ...rest } = x;
    return rest;
  });
}

/**
 * Asserts `items` (one session's events of one stream, in arrival order)
 * are all in `stream` and their `seq` are integers increasing by exactly 1
 * (from `first` if given); returns the first seq.
 */
export function assertSeqRun(items, stream, first, what = 'events') {
  if (items.length === 0) return first;
  const start = first ?? items[0].seq;
  assert.ok(Number.isInteger(start) && start >= 1, `${what}: first seq ${start} is a positive integer`);
  items.forEach((x, i) => {
    assert.equal(x.stream, stream, `${what}[${i}] stream: ${JSON.stringify(x).slice(0, 300)}`);
    assert.equal(x.seq, start + i, `${what}[${i}] seq (gap-free from ${start}): ${JSON.stringify(x).slice(0, 300)}`);
  });
  return start;
}
