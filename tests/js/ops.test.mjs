// Operations: /healthz, /readyz and /metrics without a token; `fanout
// token <user>` mints a token that connects, both with a configured secret
// and with the embedded default's generated one.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, uid, users, collect, send, assertOkAck, personalEvent, history, assertHttpError, inboxAt,
  metric, closeAndSettle, signJwt, nowSecs,
} from './harness.mjs';

describe('operations endpoints', () => {
  let server;
  before(async () => { server = await startServer(); });
  after(async () => { await server?.stop(); });

  it('/healthz answers 200 without a token', async () => {
    const r = await server.api('GET', '/healthz');
    assert.equal(r.status, 200, JSON.stringify(r.body));
  });

  it('/readyz answers 200 without a token when broker and database are reachable', async () => {
    const r = await server.api('GET', '/readyz');
    assert.equal(r.status, 200, JSON.stringify(r.body));
  });

  it('/metrics answers Prometheus text with fanout_ metrics, without a token', async () => {
    // Some traffic first, so counters exist and move.
    const alice = uid('alice');
    const a = await server.session(alice);
    assertOkAck(await send(a, { to: alice, content: 'x' }));
    const r = await server.api('GET', '/metrics');
    assert.equal(r.status, 200);
    assert.equal(typeof r.body, 'string');
    assert.match(r.headers.get('content-type') || '', /^(text\/plain|application\/openmetrics-text)/);
    assert.match(r.body, /^fanout_\w+(\{[^}]*\})? [0-9.eE+-]+$/m, 'at least one fanout_ sample');
    assert.match(r.body, /^# TYPE fanout_\w+ \w+$/m, 'TYPE lines');
  });

  it('sessions bind by reference: a refused connection binds nothing, a second tab binds nothing new (fanout_bound_keys)', async (t) => {
    if (await metric(server, 'fanout_bound_keys') === null) {
      t.skip('this build exports no fanout_bound_keys gauge');
      return;
    }
    const alice = uid('alice');
    const base = await metric(server, 'fanout_bound_keys');
    await assert.rejects(server.connect('garbage'), { message: 'unauthorized' });
    await assert.rejects(server.connect(signJwt({ sub: alice, exp: nowSecs() - 5 }, server.jwtSecret)), { message: 'unauthorized' });
    assert.equal(await metric(server, 'fanout_bound_keys'), base, 'refused connections bound nothing');
    // Both tabs on one gateway: reference counting is per gateway.
    const a1 = await server.session(alice, { gateway: 0 });
    const one = await metric(server, 'fanout_bound_keys');
    assert.equal(one, base + 1, 'the first session binds the user key');
    const a2 = await server.session(alice, { gateway: 0 });
    assert.equal(await metric(server, 'fanout_bound_keys'), one, 'a second tab binds nothing new');
    await closeAndSettle(server, a2);
    assert.equal(await metric(server, 'fanout_bound_keys'), one, 'the first tab keeps the binding');
    await closeAndSettle(server, a1);
    assert.equal(await metric(server, 'fanout_bound_keys'), base, 'the last tab releases it');
  });

  it('an unknown route answers 404 with a JSON error', async () => {
    assertHttpError(await server.api('GET', '/api/nothing-here', { token: server.token(uid()) }), 404, 'unknown route');
  });
});

describe('fanout token', () => {
  it('mints a token that connects (configured secret)', async () => {
    const server = await startServer();
    try {
      const [alice, bob] = users('alice', 'bob');
      const token = await server.cliToken(alice);
      assert.match(token, /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/, 'one line: a JWT');
      const a = await server.connect(token);
      const b = await server.connect(await server.cliToken(bob));
      const eb = collect(b, 'MESSAGE_RECEIVE');
      const ack = assertOkAck(await send(a, { to: bob, content: 'via cli token' }));
      assert.deepEqual(await eb.waitFor(1), [inboxAt(personalEvent(ack, alice, bob, 'via cli token'), 1)]);
      // The same token works on the API.
      const h = await history(server, token, `/api/conversations/${bob}/messages`);
      assert.equal(h.messages.length, 1);
      // And its claims are sub = the user, exp in the future.
      const claims = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString());
      assert.equal(claims.sub, alice);
      assert.ok(claims.exp > Date.now() / 1000);
    } finally {
      await server.stop();
    }
  });

  it('mints a token that connects (embedded default: secret generated in the data directory)', async () => {
    const server = await startServer({ jwtSecret: null });
    try {
      const alice = uid('alice');
      const token = await server.cliToken(alice);
      const a = await server.connect(token);
      const ea = collect(a, 'MESSAGE_RECEIVE');
      const ack = assertOkAck(await send(a, { to: alice, content: 'hi me' }));
      assert.deepEqual(await ea.waitFor(1), [inboxAt(personalEvent(ack, alice, alice, 'hi me'), 1)]);
      // A token signed with another secret is still refused.
      await assert.rejects(server.connect('eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4IiwiZXhwIjo0MTAyNDQ0ODAwfQ.AAAA'), { message: 'unauthorized' });
    } finally {
      await server.stop();
    }
  });
});
