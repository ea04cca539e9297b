// Connecting: a missing, malformed, expired or wrongly signed token (or one
// naming an invalid user) is refused with `connect_error` "unauthorized",
// and nothing is stored; the HTTP API answers 401 to the same tokens.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { randomBytes } from 'node:crypto';
import {
  startServer, uid, signJwt, nowSecs, collect, send, assertOkAck, assertHttpError,
  history, personalEvent, QUIET_MS, sleep, inboxAt,
} from './harness.mjs';

describe('auth', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server?.stop(); });

  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');

  /** Name, then a function from (victim user id) to the auth object sent. */
  const refusals = [
    ['missing auth object', () => undefined],
    ['auth without token', () => ({})],
    ['null token', () => ({ token: null })],
    ['numeric token', () => ({ token: 12345 })],
    ['empty token', () => ({ token: '' })],
    ['malformed token (not a JWT)', () => ({ token: 'garbage' })],
    ['malformed token (three junk parts)', () => ({ token: 'a.b.c' })],
    ['malformed token (bad JSON claims)', () => ({ token: `${b64({ alg: 'HS256', typ: 'JWT' })}.${Buffer.from('{not json').toString('base64url')}.c2ln` })],
    ['expired token', (u) => ({ token: signJwt({ sub: u, exp: nowSecs() - 5 }, server.jwtSecret) })],
    ['token without exp', (u) => ({ token: signJwt({ sub: u }, server.jwtSecret) })],
    ['token without sub', () => ({ token: signJwt({ exp: nowSecs() + 600 }, server.jwtSecret) })],
    ['wrongly signed token', (u) => ({ token: signJwt({ sub: u, exp: nowSecs() + 600 }, randomBytes(24).toString('hex')) })],
    ['tampered claims', (u) => {
      const t = signJwt({ sub: 'someone-else', exp: nowSecs() + 600 }, server.jwtSecret).split('.');
      return { token: `${t[0]}.${b64({ sub: u, exp: nowSecs() + 600 })}.${t[2]}` };
    }],
    ['alg none', (u) => ({ token: `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ sub: u, exp: nowSecs() + 600 })}.` })],
    ['sub with a colon', (u) => ({ token: signJwt({ sub: `${u}:x`, exp: nowSecs() + 600 }, server.jwtSecret) })],
    ['sub of 65 characters', () => ({ token: signJwt({ sub: 'a'.repeat(65), exp: nowSecs() + 600 }, server.jwtSecret) })],
    ['empty sub', () => ({ token: signJwt({ sub: '', exp: nowSecs() + 600 }, server.jwtSecret) })],
    ['numeric sub', () => ({ token: signJwt({ sub: 42, exp: nowSecs() + 600 }, server.jwtSecret) })],
  ];

  const receiver = uid('rcv');
  const victims = [];
  let rx;
  let rxEvents;

  for (const [name, authOf] of refusals) {
    it(`refuses a connection with ${name}: connect_error "unauthorized"`, async () => {
      if (!rx) {
        rx = await server.session(receiver);
        rxEvents = collect(rx, 'MESSAGE_RECEIVE');
      }
      const victim = uid('victim');
      victims.push(victim);
      const auth = authOf(victim);
      const socket = io(server.url, { forceNew: true, reconnection: false, auth });
      let connected = false;
      socket.on('connect', () => { connected = true; });
      const refused = new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error('no connect_error within 5 s')), 5000);
        socket.once('connect_error', (e) => { clearTimeout(t); resolve(e); });
      });
      // Sends emitted before the refusal are buffered by the client; they
      // must never be accepted.
      socket.emit('sendMessage', { to: receiver, content: 'must not be stored' });
      socket.emit('sendMessage', { to: victim, content: 'must not be stored either' });
      try {
        const err = await refused;
        assert.equal(err.message, 'unauthorized');
        assert.equal(connected, false, 'never connected');
      } finally {
        socket.close();
      }
    });
  }

  it('stored and delivered nothing for the refused connections', async () => {
    assert.ok(rx, 'the refusal tests ran');
    // A sentinel on the receiver's path proves delivery works; the refused
    // sessions' buffered sends must not show up.
    const sender = uid('snd');
    const s = await server.session(sender);
    const ack = assertOkAck(await send(s, { to: receiver, content: 'sentinel' }));
    await rxEvents.waitFor(1);
    await sleep(QUIET_MS);
    // The receiver's first inbox entry: nothing of the refused sessions took a position.
    assert.deepEqual(rxEvents.items, [inboxAt(personalEvent(ack, sender, receiver, 'sentinel'), 1)]);

    // Nothing stored for any victim, with the receiver or with itself.
    for (const victim of victims) {
      const h1 = await history(server, server.token(receiver), `/api/conversations/${victim}/messages`);
      assert.deepEqual(h1, { messages: [], nextBefore: null });
      const h2 = await history(server, server.token(victim), `/api/conversations/${victim}/messages`);
      assert.deepEqual(h2, { messages: [], nextBefore: null });
    }
  });

  it('refuses an expired token both on transports polling and websocket', async () => {
    const u = uid();
    const token = signJwt({ sub: u, exp: nowSecs() - 1 }, server.jwtSecret);
    for (const transports of [['polling'], ['websocket']]) {
      await assert.rejects(server.connect(token, { transports }), (e) => {
        assert.equal(e.message, 'unauthorized');
        return true;
      });
    }
  });

  it('accepts a valid token (sanity: the refusals above are about the token)', async () => {
    const u = uid();
    const s = await server.session(u);
    assert.equal(s.connected, true);
  });

  it('answers 401 with a JSON error to API calls without a valid bearer token', async () => {
    const u = uid();
    const bad = [
      undefined,
      'garbage',
      signJwt({ sub: u, exp: nowSecs() - 5 }, server.jwtSecret),
      signJwt({ sub: u, exp: nowSecs() + 600 }, randomBytes(24).toString('hex')),
      signJwt({ sub: 'a:b', exp: nowSecs() + 600 }, server.jwtSecret),
    ];
    for (const token of bad) {
      for (const [method, path, body] of [
        ['GET', `/api/conversations/${uid()}/messages`],
        ['GET', `/api/channels/${uid('c')}/messages`],
        ['POST', '/api/channels', { id: uid('c'), name: 'x', members: [] }],
        ['POST', `/api/channels/${uid('c')}/members`, { userId: u }],
        ['DELETE', `/api/channels/${uid('c')}/members/${u}`],
      ]) {
        const r = await server.api(method, path, { token, body });
        assertHttpError(r, 401, `${method} ${path} with token ${String(token).slice(0, 20)}`);
      }
    }
    // A scheme other than Bearer is not a bearer token.
    const r = await server.api('GET', `/api/conversations/${uid()}/messages`, {
      headers: { authorization: `Basic ${server.token(u)}` },
    });
    assertHttpError(r, 401, 'Basic scheme');
  });
});
